//! Header rewriting for forwarding: hop-by-hop removal (RFC 9110 §7.6.1 plus
//! every header the `Connection` header names), in both directions, and
//! removal of every request header that carries a gateway key.

use crate::context::hop_by_hop::{self, CONNECTION, TE, UPGRADE};
use crate::keys::format::KeyFormat;
use http::{HeaderMap, HeaderName, header};

/// Whether an upstream's answer frames its body both by `Content-Length`
/// and by `Transfer-Encoding` (RFC 9112 §6.3: to be handled as an error).
/// Checked on every answer: one lookup when, as usual, there is no
/// `Transfer-Encoding`.
pub fn contradictory_framing(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH)
}

/// Removes every request header with a value that carries a token in a
/// configured key format ([`KeyFormat::carries_key`]), whatever its name
/// and on every route: a key sent twice, under a scheme other than
/// `Bearer`, with odd spacing, in `Cookie` or in a header of the client's
/// own never reaches an upstream. Every value is scanned, not only the
/// credential-bearing headers, because a key leaks the same from any of
/// them; a name goes with all its values when one of them carries a key.
/// Other credentials (`Basic …`, a `Bearer` token that is not a gateway
/// key) pass. Allocates only when a key is found.
pub fn strip_keys(h: &mut HeaderMap, keys: &KeyFormat) {
    let mut found: Vec<HeaderName> = Vec::new();
    for (name, value) in h.iter() {
        if keys.carries_key(value.as_bytes()) && !found.contains(name) {
            found.push(name.clone());
        }
    }
    for name in found {
        h.remove(name);
    }
}

/// Whether a comma-separated `Upgrade` list names `websocket` (any case).
pub fn names_websocket(h: &HeaderMap) -> bool {
    h.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    })
}

/// Removes hop-by-hop headers, and every header named in `Connection`.
/// `Upgrade` is removed too unless `keep_upgrade` (a WebSocket route).
/// Returns whether the client asked for trailers (`TE: trailers`).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) -> bool {
    // One pass over the headers present (a handful), reading the values of
    // `TE` and `Connection` on the way, instead of a hash lookup per name;
    // most requests carry none, most answers only `Connection: keep-alive`.
    let mut found = 0u8;
    let (mut wants_trailers, mut names_more) = (false, false);
    for (name, value) in h.iter() {
        let Some(i) = hop_by_hop::index(name) else {
            continue;
        };
        match i {
            UPGRADE if keep_upgrade => continue,
            TE => {
                wants_trailers |= value.to_str().is_ok_and(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
                });
            }
            CONNECTION => {
                // `keep-alive` and `close` name nothing beyond the
                // hop-by-hop headers removed below.
                let v = value.as_bytes();
                names_more |=
                    !(v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close"));
            }
            _ => {}
        }
        found |= 1 << i;
    }
    if found == 0 {
        return false;
    }
    if names_more {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            if keep_upgrade && n == header::UPGRADE {
                continue;
            }
            h.remove(&n);
        }
    }
    for (i, name) in hop_by_hop::NAMES.iter().enumerate() {
        if found & (1 << i) != 0 {
            h.remove(name);
        }
    }
    wants_trailers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Environment;
    use crate::keys::format::PrefixRule;

    fn keys() -> KeyFormat {
        let rule = |kind: &str, environment, prefix: &str| PrefixRule {
            kind: kind.into(),
            environment,
            prefix: prefix.into(),
            length: 46,
        };
        KeyFormat::new(vec![
            rule("secret", Environment::Live, "sk_live_"),
            rule("secret", Environment::Test, "sk_test_"),
            rule("public", Environment::Live, "pk_live_"),
        ])
    }

    #[test]
    fn every_header_carrying_a_key_is_removed_and_nothing_else() {
        let k = keys();
        let (key, _) = k.generate("secret", Environment::Live).unwrap();
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        h.append(
            header::AUTHORIZATION,
            format!("Token {key}").parse().unwrap(),
        );
        h.append("x-api-key", key.parse().unwrap());
        h.append("x-api-key", "pk_live_other1".parse().unwrap());
        h.append(header::COOKIE, format!("a=1; k={key}").parse().unwrap());
        h.append("x-mine", format!("bearer\t{key}").parse().unwrap());
        h.append("x-test", "sk_test_abc".parse().unwrap());
        h.append(header::ACCEPT, "*/*".parse().unwrap());
        h.append("x-end-to-end", "mask_live_kept".parse().unwrap());
        strip_keys(&mut h, &k);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::ACCEPT], "*/*");
        assert_eq!(h["x-end-to-end"], "mask_live_kept");
    }

    #[test]
    fn other_credentials_pass() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        h.insert("x-api-key", "upstream-own-key-123".parse().unwrap());
        strip_keys(&mut h, &keys());
        assert_eq!(h.len(), 2);
        h.insert(
            header::AUTHORIZATION,
            "Bearer eyJ0eXAi.e30.sig".parse().unwrap(),
        );
        strip_keys(&mut h, &keys());
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn only_a_websocket_upgrade_is_named_websocket() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, v.parse().unwrap());
            names_websocket(&h)
        };
        assert!(with("websocket"));
        assert!(with("WebSocket"));
        assert!(with("h2c, websocket"));
        assert!(!with("h2c"));
        assert!(!with("websocketx"));
        assert!(!with(""));
        assert!(!names_websocket(&HeaderMap::new()));
    }

    #[test]
    fn removes_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop, X-Forwarded-For".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        assert!(strip_hop_by_hop(&mut h, false));
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn leaves_end_to_end_headers_and_keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "a".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h.len(), 2);
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::CONNECTION, "upgrade".parse().unwrap());
        assert!(!strip_hop_by_hop(&mut h, true));
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!strip_hop_by_hop(&mut h, false) && !h.contains_key(header::UPGRADE));
    }

    #[test]
    fn every_hop_by_hop_name_at_once_is_removed() {
        let mut h = HeaderMap::new();
        for n in [
            "te",
            "upgrade",
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "proxy-authenticate",
            "proxy-authorization",
        ] {
            h.append(n, "trailers".parse().unwrap());
        }
        h.insert("x-end-to-end", "kept".parse().unwrap());
        assert!(
            strip_hop_by_hop(&mut h, false),
            "TE: trailers was asked for"
        );
        assert_eq!(h.len(), 1, "{h:?}");
    }
}

//! Header rewriting for forwarding: hop-by-hop removal (RFC 9110 §7.6.1 plus
//! every header the `Connection` header names), in both directions.

use http::{HeaderMap, HeaderName, header};

/// Hop-by-hop headers that never cross the gateway (RFC 9110 §7.6.1, plus
/// the proxy credentials meant for us). `Trailer` is end-to-end: hyper only
/// sends the trailers it names, so it must pass.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and every header named in `Connection`.
/// `Upgrade` is removed too unless `keep_upgrade` (a WebSocket route).
/// Returns whether the client asked for trailers (`TE: trailers`).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) -> bool {
    let is_hop = |n: &HeaderName| HOP_BY_HOP.contains(n) || (!keep_upgrade && n == header::UPGRADE);
    // One pass over the names present (a handful) instead of a hash lookup
    // per hop-by-hop name: most requests carry none.
    let present: Vec<HeaderName> = h.keys().filter(|n| is_hop(n)).cloned().collect();
    if present.is_empty() {
        return false;
    }
    let wants_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            if keep_upgrade && n == header::UPGRADE {
                continue;
            }
            h.remove(&n);
        }
    }
    for n in &present {
        h.remove(n);
    }
    wants_trailers
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

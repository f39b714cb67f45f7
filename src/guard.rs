//! Stage two: the request guard, before routing. Refuses ambiguous framing
//! and hostile paths with 400 (and a closed connection), and produces the
//! one canonical path that the router matches, auth authorises and the
//! proxy forwards. Never looks at credentials or the store.

use crate::context::{Seen, hop_by_hop};
use crate::error::GatewayError;
use http::{HeaderMap, Method, Request, Version};

/// The request headers the later stages act on, in one pass over the head
/// (a handful of headers): by name length first, as the names are.
pub fn scan(h: &HeaderMap) -> Seen {
    let mut seen = Seen::default();
    for (name, value) in h {
        let n = name.as_str();
        let found = match n.len() {
            4 if n == "host" => {
                if seen.any(Seen::HOST) {
                    Seen::HOST_TWICE
                } else if value.is_empty() {
                    Seen::HOST | Seen::HOST_EMPTY
                } else {
                    Seen::HOST
                }
            }
            6 if n == "origin" => Seen::ORIGIN,
            8 if n == "x-key-id" => Seen::IDENTITY,
            9 if n == "x-api-key" => Seen::X_API_KEY,
            12 if n == "x-request-id" => Seen::X_REQUEST_ID,
            13 if n == "authorization" => Seen::AUTHORIZATION,
            14 if n == "content-length" => {
                let v = value.as_bytes();
                if seen.any(Seen::CONTENT_LENGTH) {
                    Seen::CONTENT_LENGTH_TWICE
                } else if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                    Seen::CONTENT_LENGTH | Seen::CONTENT_LENGTH_MALFORMED
                } else {
                    Seen::CONTENT_LENGTH
                }
            }
            14 if n == "x-workspace-id" => Seen::IDENTITY,
            15 if n == "x-forwarded-for" => Seen::X_FORWARDED_FOR,
            16 if n == "x-forwarded-host" => Seen::X_FORWARDED_HOST,
            17 if n == "x-key-environment" => Seen::IDENTITY,
            _ => match hop_by_hop::index(name) {
                Some(hop_by_hop::UPGRADE) => Seen::UPGRADE,
                Some(hop_by_hop::TRANSFER_ENCODING) => Seen::TRANSFER_ENCODING | Seen::HOP_BY_HOP,
                Some(_) => Seen::HOP_BY_HOP,
                None => continue,
            },
        };
        seen |= found;
    }
    seen
}

/// Checks framing and the request target; returns the canonical path
/// (`.`/`..` resolved, `//` merged; the query is not part of it). `seen` is
/// [`scan`] of the request's headers.
pub fn check<B>(
    req: &Request<B>,
    seen: Seen,
    framing_conflict: bool,
) -> Result<String, GatewayError> {
    if framing_conflict {
        return Err(GatewayError::BadRequest(
            "ambiguous framing: Content-Length with Transfer-Encoding, or twice",
        ));
    }
    check_framing(seen, req.version())?;
    let uri = req.uri();
    if req.version() <= Version::HTTP_11 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(GatewayError::BadRequest(
            "absolute-form request targets are not accepted",
        ));
    }
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported"));
    }
    canonical_path(uri.path())
}

fn check_framing(seen: Seen, version: Version) -> Result<(), GatewayError> {
    if seen.any(Seen::CONTENT_LENGTH_TWICE) {
        return Err(GatewayError::BadRequest(
            "more than one Content-Length header",
        ));
    }
    if seen.any(Seen::TRANSFER_ENCODING) && seen.any(Seen::CONTENT_LENGTH) {
        return Err(GatewayError::BadRequest(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    if seen.any(Seen::CONTENT_LENGTH_MALFORMED) {
        return Err(GatewayError::BadRequest("malformed Content-Length"));
    }
    if version == Version::HTTP_11 {
        if !seen.any(Seen::HOST) {
            return Err(GatewayError::BadRequest("missing Host header"));
        }
        if seen.any(Seen::HOST_TWICE) {
            return Err(GatewayError::BadRequest("more than one Host header"));
        }
        if seen.any(Seen::HOST_EMPTY) {
            return Err(GatewayError::BadRequest("empty Host header"));
        }
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The canonical form of a request path, or 400 for what must not be
/// forwarded: control characters, `\`, malformed or forbidden percent
/// escapes (`%2F %5C %00 %2E`), and dot segments that climb above the root.
pub fn canonical_path(path: &str) -> Result<String, GatewayError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(GatewayError::BadRequest(
            "the request target must be an absolute path",
        ));
    }
    let mut i = 0;
    let mut simple = true;
    while i < b.len() {
        match b[i] {
            c if c < 0x21 || c == 0x7f => {
                return Err(GatewayError::BadRequest("control character in the path"));
            }
            b'\\' => return Err(GatewayError::BadRequest("backslash in the path")),
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) else {
                    return Err(GatewayError::BadRequest(
                        "malformed percent-encoding in the path",
                    ));
                };
                let decoded = h * 16 + l;
                if matches!(decoded, b'/' | b'\\' | 0 | b'.') || decoded < 0x20 || decoded == 0x7f {
                    return Err(GatewayError::BadRequest(
                        "encoded /, \\, . or control character in the path",
                    ));
                }
                i += 3;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => simple = false,
            b'.' if b[i - 1] == b'/' && matches!(b.get(i + 1), None | Some(b'/') | Some(b'.')) => {
                simple = false
            }
            _ => {}
        }
        i += 1;
    }
    if simple {
        // The common case: nothing to rewrite.
        return Ok(path.to_string());
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(GatewayError::BadRequest("the path climbs above the root"));
                }
            }
            s => out.push(s),
        }
    }
    let mut canon = String::with_capacity(path.len());
    for s in &out {
        canon.push('/');
        canon.push_str(s);
    }
    if trailing || canon.is_empty() {
        canon.push('/');
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        canonical_path(p).unwrap()
    }

    fn bad(p: &str) -> bool {
        matches!(canonical_path(p), Err(GatewayError::BadRequest(_)))
    }

    #[test]
    fn canonicalises_dots_and_double_slashes() {
        assert_eq!(ok("/v1/files//a/./b/../c"), "/v1/files/a/c");
        assert_eq!(ok("/v1/a/"), "/v1/a/");
        assert_eq!(ok("/v1/a/b/.."), "/v1/a/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a/.hidden/..x"), "/a/.hidden/..x");
        assert_eq!(ok("/v1/sms/%41b"), "/v1/sms/%41b");
    }

    #[test]
    fn refuses_hostile_paths() {
        assert!(bad("/../etc/passwd"));
        assert!(bad("/a/../../b"));
        assert!(bad("/a%2Fb"));
        assert!(bad("/a%2fb"));
        assert!(bad("/a%5Cb"));
        assert!(bad("/a%00"));
        assert!(bad("/a%2E%2E/b"));
        assert!(bad("/a\\b"));
        assert!(bad("/a%zz"));
        assert!(bad("/a%4"));
        assert!(bad("/a\x01b"));
        assert!(bad("*"));
    }

    fn req(headers: &[(&str, &str)], version: Version, uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn check_<B>(r: &Request<B>) -> Result<String, GatewayError> {
        check(r, scan(r.headers()), false)
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let v = Version::HTTP_11;
        assert!(
            check_(&req(
                &[
                    ("host", "a"),
                    ("content-length", "1"),
                    ("transfer-encoding", "chunked")
                ],
                v,
                "/"
            ))
            .is_err()
        );
        assert!(
            check_(&req(
                &[
                    ("host", "a"),
                    ("content-length", "1"),
                    ("content-length", "1")
                ],
                v,
                "/"
            ))
            .is_err()
        );
        assert!(check_(&req(&[], v, "/")).is_err());
        assert!(check_(&req(&[("host", "a"), ("host", "b")], v, "/")).is_err());
        assert!(check_(&req(&[("host", "a")], v, "http://evil/x")).is_err());
        assert!(
            check_(&req(&[], Version::HTTP_2, "https://a/x")).is_ok(),
            "h2 carries :authority"
        );
        assert_eq!(
            check_(&req(&[("host", "a")], v, "/x//y?q=1")).unwrap(),
            "/x/y"
        );
    }

    #[test]
    fn the_scan_finds_every_header_a_stage_acts_on() {
        let cases: &[(&str, Seen)] = &[
            ("host", Seen::HOST),
            ("content-length", Seen::CONTENT_LENGTH),
            (
                "transfer-encoding",
                Seen::TRANSFER_ENCODING | Seen::HOP_BY_HOP,
            ),
            ("te", Seen::HOP_BY_HOP),
            ("connection", Seen::HOP_BY_HOP),
            ("keep-alive", Seen::HOP_BY_HOP),
            ("proxy-connection", Seen::HOP_BY_HOP),
            ("proxy-authenticate", Seen::HOP_BY_HOP),
            ("proxy-authorization", Seen::HOP_BY_HOP),
            ("upgrade", Seen::UPGRADE),
            ("authorization", Seen::AUTHORIZATION),
            ("x-api-key", Seen::X_API_KEY),
            ("x-request-id", Seen::X_REQUEST_ID),
            ("x-forwarded-for", Seen::X_FORWARDED_FOR),
            ("x-forwarded-host", Seen::X_FORWARDED_HOST),
            ("x-key-id", Seen::IDENTITY),
            ("x-workspace-id", Seen::IDENTITY),
            ("x-key-environment", Seen::IDENTITY),
            ("origin", Seen::ORIGIN),
            ("x-other", Seen::default()),
            ("accept", Seen::default()),
        ];
        for (name, want) in cases {
            let r = req(&[(name, "1")], Version::HTTP_11, "/");
            assert_eq!(scan(r.headers()), *want, "{name}");
        }
        // The proxy removes only what the scan flagged: every name it would
        // remove must be flagged.
        for name in &hop_by_hop::NAMES {
            let r = req(&[(name.as_str(), "1")], Version::HTTP_11, "/");
            assert!(
                scan(r.headers()).any(Seen::HOP_BY_HOP | Seen::UPGRADE),
                "{name}"
            );
        }
        let twice = req(&[("host", "a"), ("Host", "b")], Version::HTTP_11, "/");
        assert_eq!(scan(twice.headers()), Seen::HOST | Seen::HOST_TWICE);
        let empty = req(&[("host", "")], Version::HTTP_11, "/");
        assert!(scan(empty.headers()).any(Seen::HOST_EMPTY));
        assert!(check_(&empty).is_err());
        for bad in ["", "12a", "-1", "1 2"] {
            let r = req(
                &[("host", "a"), ("content-length", bad)],
                Version::HTTP_11,
                "/",
            );
            assert!(
                scan(r.headers()).any(Seen::CONTENT_LENGTH_MALFORMED),
                "{bad:?}"
            );
            assert!(check_(&r).is_err(), "{bad:?}");
        }
        let ok = req(
            &[("host", "a"), ("content-length", "12")],
            Version::HTTP_11,
            "/",
        );
        assert!(check_(&ok).is_ok());
    }
}

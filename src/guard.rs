//! Stage two: the request guard, before routing. Refuses ambiguous framing
//! and hostile paths with 400 (and a closed connection), and produces the
//! one canonical path that the router matches, auth authorises and the
//! proxy forwards. Never looks at credentials or the store.

use crate::context::{ConnInfo, Seen, hop_by_hop};
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

/// Checks framing and the request target; returns the canonical path (see
/// [`canonical_path`]; the query is not part of it). `seen` is
/// [`scan`] of the request's headers.
pub fn check<B>(
    req: &Request<B>,
    seen: Seen,
    conn: &ConnInfo,
    allow_path_parameters: bool,
) -> Result<String, GatewayError> {
    if conn.framing_conflict {
        return Err(GatewayError::BadRequest(
            "ambiguous framing: Content-Length with Transfer-Encoding, or twice",
        ));
    }
    if conn.target_fragment {
        return Err(GatewayError::BadRequest(
            "a fragment (#) in the request target",
        ));
    }
    check_framing(seen, req.version())?;
    check_host(req, seen)?;
    let uri = req.uri();
    if req.version() <= Version::HTTP_11 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(GatewayError::BadRequest(
            "absolute-form request targets are not accepted",
        ));
    }
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported"));
    }
    canonical_path(uri.path(), allow_path_parameters)
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

/// 400 for a `Host` header or an HTTP/2 `:authority` that is not
/// `host[:port]` (RFC 9110 §7.2): a host that is a reg-name or IPv4 address
/// of letters, digits and `-._~`, or a bracketed IPv6 address; a port of
/// 1–5 digits. Userinfo (`user:pass@`), a path, sub-delimiters and
/// percent-escapes are refused: no DNS name uses them, and the host goes
/// upstream in `X-Forwarded-Host`, where `,` or `@` would change its meaning.
fn check_host<B>(req: &Request<B>, seen: Seen) -> Result<(), GatewayError> {
    if let Some(a) = req.uri().authority()
        && !valid_host(a.as_str().as_bytes())
    {
        return Err(GatewayError::BadRequest("invalid :authority"));
    }
    if seen.any(Seen::HOST)
        && let Some(v) = req.headers().get(http::header::HOST)
        && !valid_host(v.as_bytes())
    {
        return Err(GatewayError::BadRequest("invalid Host header"));
    }
    Ok(())
}

/// Whether `b` is `host[:port]` as [`check_host`] accepts it.
pub fn valid_host(b: &[u8]) -> bool {
    let (host, port) = if b.first() == Some(&b'[') {
        let Some(end) = b.iter().position(|&c| c == b']') else {
            return false;
        };
        let literal = std::str::from_utf8(&b[1..end]).ok();
        if literal.is_none_or(|l| l.parse::<std::net::Ipv6Addr>().is_err()) {
            return false;
        }
        (&b[..=end], &b[end + 1..])
    } else {
        let colon = b.iter().position(|&c| c == b':').unwrap_or(b.len());
        let host = &b[..colon];
        let ok = host
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
        if !ok {
            return false;
        }
        (host, &b[colon..])
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u16>().ok())
                    .is_some()
        }
        _ => false,
    };
    !host.is_empty() && port_ok
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// What a byte of a request path is to the canonicaliser.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Stays as it is: `/`, unreserved characters, sub-delimiters but `;`,
    /// `:` and `@` (RFC 3986 `pchar`).
    Plain,
    /// `%`: an escape to decode or normalise.
    Escape,
    /// `;`: a path parameter (refused unless allowed).
    Semicolon,
    /// Allowed by the HTTP parser but not raw in a path (`"`, `{`, bytes
    /// above ASCII, …): written as an escape.
    Encode,
    /// Never forwarded: control characters, space, `\`, `#`.
    Refuse,
}

const fn classes() -> [Class; 256] {
    let mut t = [Class::Encode; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphanumeric() {
            Class::Plain
        } else {
            match c {
                b'/' | b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')'
                | b'*' | b'+' | b',' | b'=' | b':' | b'@' => Class::Plain,
                b'%' => Class::Escape,
                b';' => Class::Semicolon,
                b'\\' | b'#' | 0x7f => Class::Refuse,
                0..=0x20 => Class::Refuse,
                _ => Class::Encode,
            }
        };
        i += 1;
    }
    t
}

static CLASS: [Class; 256] = classes();

/// Whether a byte is an unreserved character (RFC 3986 §2.3), whose escape
/// means the same as the byte itself.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut Vec<u8>, c: u8) {
    out.extend_from_slice(&[
        b'%',
        HEX_UPPER[usize::from(c >> 4)],
        HEX_UPPER[usize::from(c & 15)],
    ]);
}

/// The canonical form of a request path (RFC 3986 §6.2.2), the one spelling
/// that is routed, authorised, rate-limited, logged and forwarded:
///
/// - escapes of unreserved characters decoded (`%61` is `a`), other escapes
///   in upper-case hex (`%3a` is `%3A`), bytes that may not stand raw in a
///   path escaped (`{` is `%7B`, `é` is `%C3%A9`);
/// - `.` and `..` segments resolved and `//` merged.
///
/// Refused with 400: a target that is not an absolute path; control
/// characters, space, `\` and `#`; malformed escapes and escapes of `/`,
/// `\`, `.`, NUL or control characters (a decoder behind the gateway would
/// read another path than the one routed); `..` climbing above the root; and
/// a `;` (path parameters, which Tomcat and Spring strip before routing)
/// unless `allow_params`, in which case a segment that is `.` or `..` once
/// its parameters are stripped is refused.
///
/// Idempotent: the canonical form of a canonical path is itself.
pub fn canonical_path(path: &str, allow_params: bool) -> Result<String, GatewayError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(GatewayError::BadRequest(
            "the request target must be an absolute path",
        ));
    }
    // One sweep decides whether the path is already canonical, as nearly
    // all are.
    let mut simple = true;
    for (i, &c) in b.iter().enumerate() {
        match CLASS[usize::from(c)] {
            Class::Plain => {
                let dot_or_slash = match c {
                    b'/' => b.get(i + 1) == Some(&b'/'),
                    b'.' => {
                        b[i - 1] == b'/' && matches!(b.get(i + 1), None | Some(b'/' | b'.' | b';'))
                    }
                    _ => false,
                };
                if dot_or_slash {
                    simple = false;
                }
            }
            Class::Refuse => return Err(refused(c)),
            Class::Semicolon if !allow_params => {
                return Err(GatewayError::BadRequest(
                    "path parameters (;) are not accepted in the path",
                ));
            }
            Class::Semicolon => {}
            Class::Escape | Class::Encode => simple = false,
        }
    }
    if simple {
        return Ok(path.to_string());
    }
    let normal = normalise_bytes(b)?;
    resolve_dots(&normal, allow_params)
}

fn refused(c: u8) -> GatewayError {
    GatewayError::BadRequest(match c {
        b'\\' => "backslash in the path",
        b'#' => "a fragment (#) in the request target",
        _ => "control character or space in the path",
    })
}

/// Escapes decoded or normalised and raw bytes escaped (see
/// [`canonical_path`]); `;` and refused bytes were ruled out by the caller's
/// sweep.
fn normalise_bytes(b: &[u8]) -> Result<Vec<u8>, GatewayError> {
    let mut out = Vec::with_capacity(b.len() + 8);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match CLASS[usize::from(c)] {
            Class::Escape => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) else {
                    return Err(GatewayError::BadRequest(
                        "malformed percent-encoding in the path",
                    ));
                };
                let d = h * 16 + l;
                if matches!(d, b'/' | b'\\' | b'.') || d < 0x20 || d == 0x7f {
                    return Err(GatewayError::BadRequest(
                        "encoded /, \\, . or control character in the path",
                    ));
                }
                if unreserved(d) {
                    out.push(d);
                } else {
                    push_escape(&mut out, d);
                }
                i += 3;
                continue;
            }
            Class::Encode => push_escape(&mut out, c),
            _ => out.push(c),
        }
        i += 1;
    }
    Ok(out)
}

/// `.` and `..` segments resolved, empty segments merged; a trailing `/`
/// (or a path ending in a dot segment) keeps its trailing `/`.
fn resolve_dots(b: &[u8], allow_params: bool) -> Result<String, GatewayError> {
    // Only ASCII is left: every other byte was escaped.
    let path = std::str::from_utf8(b)
        .map_err(|_| GatewayError::BadRequest("malformed percent-encoding in the path"))?;
    let mut out: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/') {
        if allow_params {
            // `..;x` is `..` to a server that strips parameters.
            let bare = seg.split(';').next().unwrap_or(seg);
            if bare != seg && (bare == "." || bare == "..") {
                return Err(GatewayError::BadRequest(
                    "a dot segment with path parameters",
                ));
            }
        }
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
        canonical_path(p, false).unwrap()
    }

    fn bad(p: &str) -> bool {
        matches!(canonical_path(p, false), Err(GatewayError::BadRequest(_)))
    }

    #[test]
    fn canonicalises_dots_and_double_slashes() {
        assert_eq!(ok("/v1/files//a/./b/../c"), "/v1/files/a/c");
        assert_eq!(ok("/v1/a/"), "/v1/a/");
        assert_eq!(ok("/v1/a/b/.."), "/v1/a/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a/.hidden/..x"), "/a/.hidden/..x");
        assert_eq!(ok("/v1/sms/%41b"), "/v1/sms/Ab");
    }

    #[test]
    fn decodes_unreserved_escapes_and_upper_cases_the_rest() {
        assert_eq!(ok("/v1/users/%61dmin"), "/v1/users/admin");
        assert_eq!(ok("/v1/%7Eme/%2d%5F"), "/v1/~me/-_");
        assert_eq!(ok("/a%3ab%40c%25d%3f"), "/a%3Ab%40c%25d%3F");
        assert_eq!(
            ok("/a%3Bb"),
            "/a%3Bb",
            "an escaped ; is data, not a parameter"
        );
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(ok("/a{b}|c\"d"), "/a%7Bb%7D%7Cc%22d");
        assert_eq!(ok("/a/%62/../c//%64/"), "/a/c/d/");
        assert_eq!(ok("/x:y@z!$&'()*+,="), "/x:y@z!$&'()*+,=");
    }

    #[test]
    fn canonical_form_is_a_fixed_point() {
        for p in [
            "/v1/users/%61dmin",
            "/a%3ab%40c%25d",
            "/caf\u{e9}/./x/../y//",
            "/a{b}",
            "/%7e%7E/~",
        ] {
            let c = ok(p);
            assert_eq!(ok(&c), c, "{p}");
        }
    }

    #[test]
    fn path_parameters_are_refused_unless_allowed() {
        assert!(bad("/v1/users/admin;x=1"));
        assert!(bad("/v1/users;/admin"));
        let allowed = |p| canonical_path(p, true);
        assert_eq!(
            allowed("/v1/users/admin;x=1").unwrap(),
            "/v1/users/admin;x=1"
        );
        assert_eq!(allowed("/a/b;v=1/../c").unwrap(), "/a/c");
        assert!(allowed("/a/..;x/b").is_err(), "`..;x` is `..` to Tomcat");
        assert!(allowed("/a/.;x/b").is_err());
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
        assert!(bad("/a b"));
        assert!(bad("/a#b"));
        assert!(bad("/a%2e/b"));
        assert!(bad("/a%7F"));
        assert!(bad("/a%1f"));
    }

    fn req(headers: &[(&str, &str)], version: Version, uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    /// A plain connection whose bytes showed nothing wrong.
    pub(super) fn plain_conn() -> ConnInfo {
        ConnInfo {
            peer: ([127, 0, 0, 1], 1).into(),
            tls: false,
            framing_conflict: false,
            target_fragment: false,
        }
    }

    fn check_<B>(r: &Request<B>) -> Result<String, GatewayError> {
        check(r, scan(r.headers()), &plain_conn(), false)
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

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn hosts_are_host_and_port_only() {
        for ok in [
            "a",
            "example.com",
            "Example.COM:8443",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::7]:443",
            "my_host.internal",
            "localhost:65535",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "",
            "user:pass@evil.com",
            "user@evil.com",
            "evil.com/x",
            "a,b",
            "a b",
            "evil.com:",
            ":80",
            "a:80:80",
            "a:65536",
            "a:123456",
            "a:8x",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "a%2eb",
            "a\\b",
            "a;b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn an_invalid_host_or_authority_is_refused() {
        let r = |host: &str| {
            Request::builder()
                .uri("/x")
                .header("host", host)
                .body(())
                .unwrap()
        };
        let conn = super::tests::plain_conn();
        let check_ = |r: &Request<()>| check(r, scan(r.headers()), &conn, false);
        assert!(check_(&r("a.example:80")).is_ok());
        assert!(matches!(
            check_(&r("user:pass@evil.com")),
            Err(GatewayError::BadRequest(_))
        ));
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://user:pass@evil.com/x")
            .body(())
            .unwrap();
        assert!(check_(&h2).is_err(), "userinfo in :authority");
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://good.example/x")
            .body(())
            .unwrap();
        assert!(check_(&h2).is_ok());
    }
}

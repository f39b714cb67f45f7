//! Stage four: key authentication and authorisation. Finds the credential,
//! checks its format and checksum (no store call for junk), resolves it
//! through the local cache, then checks status, expiry, kind, routes, IP,
//! origin and permissions, each with its own error code. Never touches the
//! store on a cached key; never logs or forwards a secret.

pub mod breaker;
pub mod cache;

pub use cache::KeyCache;

use crate::config::{Config, Route};
use crate::context::{AuthedKey, Identity, Seen, names};
use crate::error::GatewayError;
use crate::keys::KeyStatus;
use crate::time::Timestamp;
use http::{HeaderMap, header};
use std::net::IpAddr;

/// Query parameter names that carry credentials by convention.
const QUERY_KEY_NAMES: [&str; 5] = ["api_key", "apikey", "api-key", "x-api-key", "access_token"];

/// 400 KEY_IN_QUERY when the query string carries a credential: a
/// conventional parameter name, or any value with a configured key prefix.
pub fn check_query(query: Option<&str>, cfg: &Config) -> Result<(), GatewayError> {
    let Some(q) = query else { return Ok(()) };
    for pair in q.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if QUERY_KEY_NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
            || cfg.key_format.has_known_prefix(value)
        {
            return Err(GatewayError::KeyInQuery);
        }
    }
    Ok(())
}

/// The credential a request carries: `Authorization: Bearer` or `X-API-Key`.
/// Two different ones are ambiguous (400). `seen` says which of the two
/// headers are present, so an absent one costs no lookup.
pub fn credential(h: &HeaderMap, seen: Seen) -> Result<Option<&str>, GatewayError> {
    let bearer = if seen.any(Seen::AUTHORIZATION) {
        let mut auths = h.get_all(header::AUTHORIZATION).iter();
        match (auths.next(), auths.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(GatewayError::BadRequest(
                    "more than one Authorization header",
                ));
            }
            (Some(v), None) => {
                let s = v.to_str().map_err(|_| GatewayError::InvalidApiKey)?;
                match s.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                        Some(token.trim())
                    }
                    _ => None,
                }
            }
        }
    } else {
        None
    };
    let header_key = if seen.any(Seen::X_API_KEY) {
        let mut keys = h.get_all(names::X_API_KEY).iter();
        match (keys.next(), keys.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(GatewayError::BadRequest("more than one X-API-Key header"));
            }
            (Some(v), None) => Some(v.to_str().map_err(|_| GatewayError::InvalidApiKey)?.trim()),
        }
    } else {
        None
    };
    match (bearer, header_key) {
        (Some(a), Some(b)) if a != b => Err(GatewayError::BadRequest(
            "two different API keys in one request",
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// What auth needs to know about the request besides its headers.
pub struct AuthInput<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// Which of them the guard saw.
    pub seen: Seen,
    /// The client address as the gateway believes it.
    pub client_ip: IpAddr,
    /// The matched route.
    pub route: &'a Route,
}

/// Authenticates and authorises a request on a keyed route.
pub async fn authenticate(
    input: &AuthInput<'_>,
    cfg: &Config,
    keys: &KeyCache,
) -> Result<Identity, GatewayError> {
    let secret = credential(input.headers, input.seen)?.ok_or(GatewayError::MissingApiKey)?;
    let parsed = cfg
        .key_format
        .parse(secret)
        .ok_or(GatewayError::InvalidApiKey)?;
    let record = keys
        .get(&parsed.digest, &cfg.cache)
        .await
        .map_err(|_| GatewayError::AuthUnavailable)?
        .ok_or(GatewayError::InvalidApiKey)?;
    authorize(&record, input, &parsed.rule.kind)?;
    keys.note_used(&record);
    Ok(Identity { key: record })
}

/// The checks on a found key, in the order of DESIGN.md's table.
pub fn authorize(
    key: &AuthedKey,
    input: &AuthInput<'_>,
    presented_kind: &str,
) -> Result<(), GatewayError> {
    if key.status != KeyStatus::Active {
        return Err(GatewayError::KeyInactive);
    }
    if key.expires_at.is_some_and(|t| t <= Timestamp::now()) {
        return Err(GatewayError::KeyExpired);
    }
    let route = input.route;
    if &*key.kind != presented_kind || !route.key_kinds.iter().any(|k| **k == *key.kind) {
        return Err(GatewayError::KeyKindNotAllowed);
    }
    if !key.allowed_routes.is_empty() && !route_listed(&key.allowed_routes, &route.name) {
        return Err(GatewayError::Forbidden(format!(
            "this API key may not call route {}",
            route.name
        )));
    }
    if !key.allowed_ips.is_empty() && !key.allowed_ips.iter().any(|n| n.contains(&input.client_ip))
    {
        return Err(GatewayError::IpNotAllowed);
    }
    if !key.allowed_origins.is_empty() {
        let host = request_origin_host(input.headers).ok_or(GatewayError::OriginNotAllowed)?;
        if !key.allowed_origins.iter().any(|o| origin_matches(o, host)) {
            return Err(GatewayError::OriginNotAllowed);
        }
    }
    for needed in &route.permissions {
        if !holds(&key.permissions, needed) {
            return Err(GatewayError::Forbidden(format!(
                "this API key lacks the permission {needed} required by route {}",
                route.name
            )));
        }
    }
    Ok(())
}

/// Whether `route` is in an `allowed_routes` list. Route names are the
/// config's case-sensitive identifiers: compared exactly, here and in
/// self-service narrowing alike, so a list means the same everywhere.
pub fn route_listed<S: AsRef<str>>(allowed: &[S], route: &str) -> bool {
    allowed.iter().any(|r| r.as_ref() == route)
}

/// Whether a set of held permissions covers `needed`: exact, `*`, or `prefix.*`.
pub fn holds<S: AsRef<str>>(held: &[S], needed: &str) -> bool {
    held.iter().map(AsRef::as_ref).any(|p| {
        p == "*"
            || p == needed
            || p.strip_suffix(".*").is_some_and(|pre| {
                needed.len() > pre.len() + 1
                    && needed.starts_with(pre)
                    && needed.as_bytes()[pre.len()] == b'.'
            })
    })
}

/// The host of `Origin`, else of `Referer`.
pub fn request_origin_host(h: &HeaderMap) -> Option<&str> {
    let v = h
        .get(header::ORIGIN)
        .or_else(|| h.get(header::REFERER))?
        .to_str()
        .ok()?;
    let rest = v.split_once("://").map(|(_, r)| r).unwrap_or(v);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if host.starts_with('[') {
        host.split_once(']').map(|(h, _)| &h[1..])?
    } else {
        host.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Whether an `allowed_origins` entry matches a host: exact (case-insensitive),
/// or `*.example.com` for subdomains. A scheme or port in the entry is ignored.
pub fn origin_matches(allowed: &str, host: &str) -> bool {
    let a = allowed.split_once("://").map(|(_, r)| r).unwrap_or(allowed);
    let a = a.split(['/', ':']).next().unwrap_or(a);
    if let Some(suffix) = a.strip_prefix("*.") {
        return host.len() > suffix.len() + 1
            && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.';
    }
    a.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_wildcards() {
        let held = vec!["sms.*".to_string(), "billing.read".to_string()];
        assert!(holds(&held, "sms.send"));
        assert!(holds(&held, "sms.send.bulk"));
        assert!(!holds(&held, "smsx.send"));
        assert!(!holds(&held, "sms"));
        assert!(holds(&held, "billing.read"));
        assert!(!holds(&held, "billing.write"));
        assert!(holds(&["*".to_string()], "anything.at.all"));
        assert!(!holds::<String>(&[], "sms.send"), "deny by default");
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            "https://app.example.com:8443".parse().unwrap(),
        );
        assert_eq!(request_origin_host(&h), Some("app.example.com"));
        assert!(origin_matches("app.example.com", "app.example.com"));
        assert!(origin_matches("https://app.example.com", "APP.example.com"));
        assert!(origin_matches("*.example.com", "app.example.com"));
        assert!(!origin_matches("*.example.com", "example.com"));
        assert!(!origin_matches("*.example.com", "evilexample.com"));
        assert!(!origin_matches("example.com", "localhost"));
        let mut h = HeaderMap::new();
        h.insert(
            header::REFERER,
            "http://localhost:3000/page?x=1".parse().unwrap(),
        );
        assert_eq!(request_origin_host(&h), Some("localhost"));
    }

    #[test]
    fn allowed_routes_compare_exactly() {
        let list = vec!["sms.send".to_string()];
        assert!(route_listed(&list, "sms.send"));
        assert!(!route_listed(&list, "SMS.send"));
        assert!(!route_listed(&list, "sms.send "));
        assert!(!route_listed::<String>(&[], "sms.send"));
    }

    #[test]
    fn credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h, crate::guard::scan(&h)).unwrap(), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(credential(&h, crate::guard::scan(&h)).unwrap(), Some("abc"));
        h.insert("x-api-key", "abc".parse().unwrap());
        assert_eq!(
            credential(&h, crate::guard::scan(&h)).unwrap(),
            Some("abc"),
            "the same key twice is not ambiguous"
        );
        h.insert("x-api-key", "def".parse().unwrap());
        assert!(matches!(
            credential(&h, crate::guard::scan(&h)),
            Err(GatewayError::BadRequest(_))
        ));
    }
}

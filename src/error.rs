//! The one error type of the request path and its mapping to the status/code
//! table of DESIGN.md. Every stage returns [`GatewayError`]; only
//! `pipeline` turns it into a response (JSON body, request id) and logs it.

use crate::context::{ResponseBody, full_body};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use std::borrow::Cow;

/// Where an error came from: decides 4xx vs 5xx and the log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something we refuse.
    Client,
    /// The upstream service failed us.
    Upstream,
    /// The gateway itself (store down, overload, bug).
    Internal,
}

/// Everything a request can run into on its way through the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Malformed or ambiguous request (framing, path, two credentials).
    #[error("{0}")]
    BadRequest(&'static str),
    /// A credential was sent in the query string.
    #[error("{}", self.fixed_text())]
    KeyInQuery,
    /// No credential on a keyed route.
    #[error("{}", self.fixed_text())]
    MissingApiKey,
    /// Unknown, malformed or revoked key.
    #[error("{}", self.fixed_text())]
    InvalidApiKey,
    /// The key exists but is disabled.
    #[error("{}", self.fixed_text())]
    KeyInactive,
    /// The key is past its `expires_at`.
    #[error("{}", self.fixed_text())]
    KeyExpired,
    /// The key lacks a permission the route needs, or the route is outside
    /// the key's `allowed_routes`. The text is shown to the client.
    #[error("{0}")]
    Forbidden(String),
    /// The key's kind (e.g. public) may not call this route.
    #[error("{}", self.fixed_text())]
    KeyKindNotAllowed,
    /// The client address is outside the key's `allowed_ips`.
    #[error("{}", self.fixed_text())]
    IpNotAllowed,
    /// `Origin`/`Referer` is outside the key's `allowed_origins`.
    #[error("{}", self.fixed_text())]
    OriginNotAllowed,
    /// No route matches the path.
    #[error("{}", self.fixed_text())]
    NotFound,
    /// A route matches the path but not the method.
    #[error("{}", self.fixed_text())]
    MethodNotAllowed {
        /// The `Allow` header value listing the route's methods.
        allow: HeaderValue,
    },
    /// The request body is larger than the route allows.
    #[error("{}", self.fixed_text())]
    PayloadTooLarge,
    /// The request headers are larger than allowed.
    #[error("{}", self.fixed_text())]
    HeadersTooLarge,
    /// A rate limit refused the request.
    #[error("rate limit exceeded; retry after {retry_after} s")]
    RateLimited {
        /// Whole seconds until a request will be admitted.
        retry_after: u64,
    },
    /// The upstream refused, reset, or answered malformed. The text is logged, never sent.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The upstream did not answer within the route's request timeout.
    #[error("{}", self.fixed_text())]
    UpstreamTimeout,
    /// The key store is down and the key is not in the local cache.
    #[error("{}", self.fixed_text())]
    AuthUnavailable,
    /// The gateway sheds load (too many requests in flight).
    #[error("{}", self.fixed_text())]
    Overloaded,
    /// A bug or an unexpected internal failure. The text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            BadRequest(_) | KeyInQuery => StatusCode::BAD_REQUEST,
            MissingApiKey | InvalidApiKey | KeyInactive | KeyExpired => StatusCode::UNAUTHORIZED,
            Forbidden(_) | KeyKindNotAllowed | IpNotAllowed | OriginNotAllowed => {
                StatusCode::FORBIDDEN
            }
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            AuthUnavailable | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of DESIGN.md.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            BadRequest(_) => "BAD_REQUEST",
            KeyInQuery => "KEY_IN_QUERY",
            MissingApiKey => "MISSING_API_KEY",
            InvalidApiKey => "INVALID_API_KEY",
            KeyInactive => "API_KEY_INACTIVE",
            KeyExpired => "API_KEY_EXPIRED",
            Forbidden(_) => "FORBIDDEN",
            KeyKindNotAllowed => "KEY_KIND_NOT_ALLOWED",
            IpNotAllowed => "IP_NOT_ALLOWED",
            OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
            NotFound => "NOT_FOUND",
            MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            HeadersTooLarge => "HEADERS_TOO_LARGE",
            RateLimited { .. } => "RATE_LIMITED",
            UpstreamUnavailable(_) => "UPSTREAM_UNAVAILABLE",
            UpstreamTimeout => "UPSTREAM_TIMEOUT",
            AuthUnavailable => "AUTH_UNAVAILABLE",
            Overloaded => "OVERLOADED",
            Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// Who is to blame: the client, the upstream, or the gateway.
    pub fn source(&self) -> ErrorSource {
        use GatewayError::*;
        match self {
            UpstreamUnavailable(_) | UpstreamTimeout => ErrorSource::Upstream,
            AuthUnavailable | Overloaded | Internal(_) => ErrorSource::Internal,
            BadRequest(_)
            | KeyInQuery
            | MissingApiKey
            | InvalidApiKey
            | KeyInactive
            | KeyExpired
            | Forbidden(_)
            | KeyKindNotAllowed
            | IpNotAllowed
            | OriginNotAllowed
            | NotFound
            | MethodNotAllowed { .. }
            | PayloadTooLarge
            | HeadersTooLarge
            | RateLimited { .. } => ErrorSource::Client,
        }
    }

    /// The message shown to the client: internal detail never leaves the gateway.
    pub fn public_message(&self) -> Cow<'static, str> {
        match self {
            GatewayError::UpstreamUnavailable(_) => "the upstream service is unavailable".into(),
            GatewayError::Internal(_) => "internal error".into(),
            GatewayError::Forbidden(s) => Cow::Owned(s.clone()),
            GatewayError::RateLimited { .. } => Cow::Owned(self.to_string()),
            other => Cow::Borrowed(other.fixed_text()),
        }
    }

    /// Whether the connection must be closed after answering (framing errors:
    /// what follows on the connection cannot be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(self, GatewayError::BadRequest(_))
    }

    /// The client-facing text of the variants whose text is fixed (their
    /// `Display`), borrowed: an answer to a refusal allocates no message.
    /// Empty for the variants that carry their own text.
    fn fixed_text(&self) -> &'static str {
        use GatewayError::*;
        match self {
            KeyInQuery => {
                "API keys must not be sent in the query string; use the Authorization header"
            }
            MissingApiKey => "an API key is required: send Authorization: Bearer <key>",
            InvalidApiKey => "the API key is invalid",
            KeyInactive => "the API key is disabled",
            KeyExpired => "the API key has expired",
            KeyKindNotAllowed => "this kind of API key may not call this route",
            IpNotAllowed => "requests from this address are not allowed for this API key",
            OriginNotAllowed => "requests from this origin are not allowed for this API key",
            NotFound => "no route matches this path",
            MethodNotAllowed { .. } => "method not allowed on this path",
            PayloadTooLarge => "the request body is too large",
            HeadersTooLarge => "the request headers are too large",
            UpstreamTimeout => "upstream timed out",
            AuthUnavailable => "authentication is temporarily unavailable",
            Overloaded => "the gateway is overloaded",
            BadRequest(s) => s,
            _ => "",
        }
    }

    /// The JSON error response of DESIGN.md for this error.
    pub fn to_response(&self, request_id: &str) -> Response<ResponseBody> {
        // Written by hand: refusals are the hot path of an attack, and a
        // serde_json::Value tree per answer costs more than the answer.
        let message = self.public_message();
        let mut body = String::with_capacity(96 + message.len() + request_id.len());
        body.push_str(r#"{"error":{"code":""#);
        body.push_str(self.code());
        body.push_str(r#"","message":"#);
        push_json_string(&mut body, &message);
        body.push_str(r#","request_id":"#);
        push_json_string(&mut body, request_id);
        body.push_str("}}");
        let bytes = body.into_bytes();
        let mut resp = Response::new(full_body(Bytes::from(bytes)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::MethodNotAllowed { allow } => {
                h.insert(header::ALLOW, allow.clone());
            }
            GatewayError::RateLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        if self.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Appends `s` as a JSON string literal (quoted and escaped).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    // Messages and request ids rarely need escaping: copy them whole.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_texts_are_the_display_and_are_sent_borrowed() {
        use GatewayError::*;
        let allow = HeaderValue::from_static("GET");
        for e in [
            KeyInQuery,
            MissingApiKey,
            InvalidApiKey,
            KeyInactive,
            KeyExpired,
            KeyKindNotAllowed,
            IpNotAllowed,
            OriginNotAllowed,
            NotFound,
            MethodNotAllowed { allow },
            PayloadTooLarge,
            HeadersTooLarge,
            UpstreamTimeout,
            AuthUnavailable,
            Overloaded,
            BadRequest("bad framing"),
        ] {
            assert!(!e.fixed_text().is_empty(), "{e:?}");
            assert_eq!(e.to_string(), e.fixed_text());
            assert!(matches!(e.public_message(), Cow::Borrowed(m) if m == e.fixed_text()));
        }
        assert_eq!(
            RateLimited { retry_after: 3 }.public_message(),
            "rate limit exceeded; retry after 3 s"
        );
        assert_eq!(Forbidden("lacks x".into()).public_message(), "lacks x");
    }

    #[test]
    fn the_body_is_valid_json_with_escaping() {
        let e = GatewayError::Forbidden("lacks \"sms.send\"\\ \n".into());
        let resp = e.to_response("r-1");
        let body = match resp.into_body() {
            http_body_util::Either::Right(full) => full,
            http_body_util::Either::Left(_) => panic!("not a full body"),
        };
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
            .expect("ready")
            .expect("infallible")
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
        assert_eq!(v["error"]["code"], "FORBIDDEN");
        assert_eq!(v["error"]["message"], "lacks \"sms.send\"\\ \n");
        assert_eq!(v["error"]["request_id"], "r-1");
    }

    #[test]
    fn every_variant_maps_to_the_design_table() {
        let allow = HeaderValue::from_static("GET");
        let cases: Vec<(GatewayError, u16, &str)> = vec![
            (GatewayError::BadRequest("x"), 400, "BAD_REQUEST"),
            (GatewayError::KeyInQuery, 400, "KEY_IN_QUERY"),
            (GatewayError::MissingApiKey, 401, "MISSING_API_KEY"),
            (GatewayError::InvalidApiKey, 401, "INVALID_API_KEY"),
            (GatewayError::KeyInactive, 401, "API_KEY_INACTIVE"),
            (GatewayError::KeyExpired, 401, "API_KEY_EXPIRED"),
            (GatewayError::Forbidden("x".into()), 403, "FORBIDDEN"),
            (GatewayError::KeyKindNotAllowed, 403, "KEY_KIND_NOT_ALLOWED"),
            (GatewayError::IpNotAllowed, 403, "IP_NOT_ALLOWED"),
            (GatewayError::OriginNotAllowed, 403, "ORIGIN_NOT_ALLOWED"),
            (GatewayError::NotFound, 404, "NOT_FOUND"),
            (
                GatewayError::MethodNotAllowed { allow },
                405,
                "METHOD_NOT_ALLOWED",
            ),
            (GatewayError::PayloadTooLarge, 413, "PAYLOAD_TOO_LARGE"),
            (GatewayError::HeadersTooLarge, 431, "HEADERS_TOO_LARGE"),
            (
                GatewayError::RateLimited { retry_after: 3 },
                429,
                "RATE_LIMITED",
            ),
            (
                GatewayError::UpstreamUnavailable("x".into()),
                502,
                "UPSTREAM_UNAVAILABLE",
            ),
            (GatewayError::UpstreamTimeout, 504, "UPSTREAM_TIMEOUT"),
            (GatewayError::AuthUnavailable, 503, "AUTH_UNAVAILABLE"),
            (GatewayError::Overloaded, 503, "OVERLOADED"),
            (GatewayError::Internal("x".into()), 500, "INTERNAL_ERROR"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn internal_detail_never_reaches_the_body() {
        let resp =
            GatewayError::UpstreamUnavailable("connect 10.0.0.5: refused".into()).to_response("r1");
        assert_eq!(resp.status(), 502);
        let msg = GatewayError::Internal("secret detail".into()).public_message();
        assert!(!msg.contains("secret"));
    }

    #[test]
    fn missing_key_carries_www_authenticate_and_rate_limit_retry_after() {
        let r = GatewayError::MissingApiKey.to_response("r");
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = GatewayError::RateLimited { retry_after: 7 }.to_response("r");
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
    }
}

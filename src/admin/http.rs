//! Small HTTP helpers shared by the admin API and the self-service
//! endpoints: JSON answers in the error shape of DESIGN.md, bounded body
//! reading, strict JSON parsing that names the offending field, query
//! strings, and the mapping of [`OpsError`] to statuses.

use super::ops::OpsError;
use crate::context::{ResponseBody, full_body};
use crate::keys::{KeyRecord, StoreError};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Largest request body the admin and self-service endpoints read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest key id or cursor accepted from a client.
const MAX_ID_LEN: usize = 128;

/// An error answer: status, stable code, message shown to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human message (never holds a secret or internal detail).
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    /// `Allow` header for 405.
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// An error with no field and no `Allow`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            allow: None,
        }
    }

    /// 400 BAD_REQUEST.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    /// 400 BAD_REQUEST about one field; the message starts with the field name.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        let mut e = Self::bad_request(format!("{field}: {message}"));
        e.field = Some(field.to_string());
        e
    }

    /// 404 NOT_FOUND for a key id.
    pub fn no_such_key() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no key with that id")
    }

    /// 404 NOT_FOUND for a path.
    pub fn no_such_path() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
    }

    /// 405 METHOD_NOT_ALLOWED with `Allow`.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed on this path",
        );
        e.allow = Some(allow);
        e
    }

    /// 413 PAYLOAD_TOO_LARGE.
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is larger than {} bytes", MAX_BODY_BYTES),
        )
    }

    /// Maps a store failure: 503 when it cannot be reached, 409 on a conflict, else 500.
    pub fn store(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Timeout | StoreError::CircuitOpen => {
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "STORE_UNAVAILABLE",
                    "the key store is unavailable; the change may not have been applied: retry",
                )
            }
            StoreError::ReadOnly(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                "the key store refuses writes (out of memory or read-only); the change may not have been applied: retry once it accepts writes",
            ),
            StoreError::Conflict(_) => Self::new(
                StatusCode::CONFLICT,
                "CONFLICT",
                "the key already exists; retry",
            ),
            StoreError::Corrupt(_) | StoreError::Config(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "internal error in the key store",
            ),
        }
    }

    /// Whether this is a store failure worth a log line.
    pub fn is_server_side(&self) -> bool {
        self.status.is_server_error()
    }

    /// The JSON body of DESIGN.md for this error.
    pub fn body(&self, request_id: &str) -> Bytes {
        let mut err = serde_json::json!({ "code": self.code, "message": self.message, "request_id": request_id });
        if let (Some(f), Some(o)) = (&self.field, err.as_object_mut()) {
            o.insert("field".into(), Value::String(f.clone()));
        }
        Bytes::from(serde_json::to_vec(&serde_json::json!({ "error": err })).unwrap_or_default())
    }

    /// The whole error response (JSON body, `Allow`, `WWW-Authenticate` …).
    pub fn to_response(&self, request_id: &str) -> Response<ResponseBody> {
        let mut resp = json_response(self.status, self.body(request_id));
        self.headers(resp.headers_mut());
        resp
    }

    /// Headers that go with this error (`Allow`, `WWW-Authenticate`, `Connection: close`).
    pub fn headers(&self, h: &mut HeaderMap) {
        if let Some(a) = self.allow {
            h.insert(header::ALLOW, HeaderValue::from_static(a));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was not read: the connection cannot be reused.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Invalid { field, message } => ApiError::invalid(field, message),
            OpsError::NotFound => ApiError::no_such_key(),
            OpsError::Store(e) => ApiError::store(&e),
        }
    }
}

/// An error response in the shape of DESIGN.md: `{"error":{"code","message","request_id"}}`.
pub fn json_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
    request_id: &str,
) -> Response<ResponseBody> {
    ApiError::new(status, code, message).to_response(request_id)
}

/// A response with a JSON body (or none, for an empty `body`).
pub fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let len = body.len();
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    if len > 0 {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A successful JSON answer.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body; `None` for 204.
    pub body: Option<Value>,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn ok(body: Value) -> Self {
        Reply {
            status: StatusCode::OK,
            body: Some(body),
        }
    }

    /// 201 with a JSON body.
    pub fn created(body: Value) -> Self {
        Reply {
            status: StatusCode::CREATED,
            body: Some(body),
        }
    }

    /// 204 with no body.
    pub fn no_content() -> Self {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
        }
    }

    /// The serialized body (empty for 204).
    pub fn bytes(&self) -> Bytes {
        match &self.body {
            Some(v) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            None => Bytes::new(),
        }
    }

    /// The whole response.
    pub fn to_response(&self) -> Response<ResponseBody> {
        json_response(self.status, self.bytes())
    }
}

/// A key record as JSON, with the secret only when given (create, rotate).
/// Records never hold a digest.
pub fn record_json(rec: &KeyRecord, secret: Option<&str>) -> Value {
    let mut v = serde_json::to_value(rec).unwrap_or(Value::Null);
    if let (Some(s), Some(o)) = (secret, v.as_object_mut()) {
        o.insert("secret".into(), Value::String(s.to_string()));
    }
    v
}

/// Reads a request body of at most [`MAX_BODY_BYTES`] (413 past it).
pub async fn read_body<B>(headers: &HeaderMap, body: B) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::too_large());
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}

/// Parses a JSON object body into `T`. Errors are 400 and name the field at
/// fault: an unknown field, or a value of the wrong type. An empty body is
/// `{}` when `empty_ok`, else an error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], empty_ok: bool) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 JSON"))?;
    let v: Value = if text.trim().is_empty() {
        if !empty_ok {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        Value::Object(Default::default())
    } else {
        serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        })?
    };
    let Value::Object(obj) = &v else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match T::deserialize(&v) {
        Ok(t) => Ok(t),
        Err(e) => {
            // serde does not say which field a type error is about: find the
            // first member that fails on its own (all fields are optional).
            for (k, val) in obj {
                let single = Value::Object([(k.clone(), val.clone())].into_iter().collect());
                if let Err(fe) = T::deserialize(&single) {
                    return Err(ApiError::invalid(k, fe));
                }
            }
            Err(ApiError::bad_request(e.to_string()))
        }
    }
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode_component(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The parameters of a list request.
#[derive(Debug, Default)]
pub struct ListQuery {
    /// `workspace` (admin only).
    pub workspace: Option<String>,
    /// `limit` (default 50, 1 ..= 500).
    pub limit: usize,
    /// `cursor` from a previous page.
    pub cursor: Option<String>,
}

/// Default page size.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page size.
pub const MAX_LIMIT: usize = 500;

/// Parses `workspace` (when allowed), `limit` and `cursor`. Unknown or
/// repeated parameters are 400, so a misspelt filter never lists everything.
pub fn parse_list_query(query: Option<&str>, allow_workspace: bool) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    let mut seen_limit = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(name).ok_or_else(|| {
            ApiError::bad_request("the query string is not valid percent-encoded UTF-8")
        })?;
        let field = match name.as_str() {
            "workspace" if allow_workspace => "workspace",
            "limit" => "limit",
            "cursor" => "cursor",
            other => {
                let shown: String = other.chars().take(64).collect();
                let known = if allow_workspace {
                    "workspace, limit, cursor"
                } else {
                    "limit, cursor"
                };
                return Err(ApiError::invalid(
                    "query",
                    format!("unknown parameter {shown:?}; use {known}"),
                ));
            }
        };
        let value = decode_component(value)
            .ok_or_else(|| ApiError::invalid(field, "not valid percent-encoded UTF-8"))?;
        let repeated = match field {
            "workspace" => q.workspace.replace(value).is_some(),
            "cursor" => {
                if value.len() > MAX_ID_LEN || !value.bytes().all(id_byte) {
                    return Err(ApiError::invalid(
                        "cursor",
                        "not a cursor returned by this API",
                    ));
                }
                q.cursor.replace(value).is_some()
            }
            _ => {
                q.limit = match value.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(ApiError::invalid(
                            "limit",
                            format!("must be a whole number from 1 to {MAX_LIMIT}"),
                        ));
                    }
                };
                std::mem::replace(&mut seen_limit, true)
            }
        };
        if repeated {
            return Err(ApiError::invalid(field, "given more than once"));
        }
    }
    if q.workspace.as_deref().is_some_and(|w| w.is_empty()) {
        return Err(ApiError::invalid("workspace", "must not be empty"));
    }
    Ok(q)
}

fn id_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Whether a path segment can be a key id (checked before any store call).
pub fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(id_byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ops::{KeyPatch, NewKey};

    #[test]
    fn parse_json_names_the_field() {
        let e = parse_json::<NewKey>(br#"{"workspace":"w","colour":"red"}"#, false).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("colour"));
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = parse_json::<NewKey>(br#"{"workspace":"w","permissions":"sms.read"}"#, false)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("permissions"));
        let e = parse_json::<NewKey>(b"{not json", false).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(parse_json::<NewKey>(b"", false).is_err());
        assert!(parse_json::<NewKey>(b"[1]", false).is_err());
        let p = parse_json::<KeyPatch>(br#"{"plan":null}"#, false).unwrap();
        assert_eq!(p.plan, Some(None));
    }

    #[test]
    fn list_query() {
        let q = parse_list_query(Some("workspace=ws%20a&limit=2&cursor=key_abc"), true).unwrap();
        assert_eq!(q.workspace.as_deref(), Some("ws a"));
        assert_eq!(q.limit, 2);
        assert_eq!(q.cursor.as_deref(), Some("key_abc"));
        assert_eq!(parse_list_query(None, true).unwrap().limit, DEFAULT_LIMIT);
        for bad in ["limit=0", "limit=501", "limit=x", "limit=1&limit=2"] {
            assert_eq!(
                parse_list_query(Some(bad), true)
                    .unwrap_err()
                    .field
                    .as_deref(),
                Some("limit"),
                "{bad}"
            );
        }
        assert!(parse_list_query(Some("workspace=a"), false).is_err());
        assert!(parse_list_query(Some("workspce=a"), true).is_err());
        assert!(parse_list_query(Some("cursor=a%20b"), true).is_err());
    }
}

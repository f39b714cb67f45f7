//! Self-service key endpoints on the public listener (`[self_service]
//! enabled = true`): a key with `keys.read` lists the keys of its own
//! workspace, one with `keys.write` creates and revokes keys there.
//!
//! The caller is authenticated exactly like a normal route (status, expiry,
//! kind, `allowed_routes`, IP, origin, permission), as the synthetic route
//! `self_service` for secret keys; it is rate limited by its plan like any
//! keyed route. A key never grants more than it has: every requested
//! permission must be held, and the new key is of the caller's kind, stays
//! in the caller's workspace, environment and plan, expires no later than
//! the caller, and inherits (or narrows) the caller's IP, origin and route
//! restrictions. A workspace holding `[self_service] max_keys_per_workspace`
//! keys gets no more (409 `KEY_LIMIT_REACHED`). A key may revoke only keys
//! whose every permission it holds itself. A key of another workspace is
//! answered 404, as if it did not exist.

use super::api::{self, Actor};
use super::http::{ApiError, Reply, parse_json, parse_list_query, plausible_id, read_body};
use super::ops::{self, NewKey};
use crate::auth::{self, AuthInput};
use crate::config::{AuthMode, Config, Route};
use crate::context::{AuthedKey, RequestBody};
use crate::context::{RequestCtx, ResponseBody};
use crate::error::GatewayError;
use crate::keys::{Environment, KeyRecord};
use crate::server::App;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use tokio::sync::Mutex;

/// The route name self-service requests are logged, counted and limited under
/// (list it in a key's `allowed_routes` to let a restricted key use them).
pub const ROUTE_NAME: &str = "self_service";
/// Permission needed to list keys.
pub const READ_PERMISSION: &str = "keys.read";
/// Permission needed to create and revoke keys.
pub const WRITE_PERMISSION: &str = "keys.write";

const COLLECTION: &str = "/v1/api-keys";

fn synthetic_route(permission: &str) -> Route {
    Route {
        name: Arc::from(ROUTE_NAME),
        methods: None,
        path: COLLECTION.to_string(),
        upstream: Arc::from(""),
        permissions: vec![permission.to_string()],
        key_kinds: vec!["secret".to_string()],
        auth: AuthMode::Key,
        limits: Vec::new(),
        max_body_bytes: super::http::MAX_BODY_BYTES as u64,
        websocket: false,
    }
}

static READ_ROUTE: LazyLock<Route> = LazyLock::new(|| synthetic_route(READ_PERMISSION));
static WRITE_ROUTE: LazyLock<Route> = LazyLock::new(|| synthetic_route(WRITE_PERMISSION));

/// Whether a canonical path is a self-service path.
pub fn handles(path: &str) -> bool {
    path == COLLECTION || path.starts_with("/v1/api-keys/")
}

enum Endpoint {
    List,
    Create,
    Delete(String),
}

fn endpoint(method: &Method, path: &str) -> Result<Endpoint, GatewayError> {
    if path == COLLECTION {
        return match *method {
            Method::GET => Ok(Endpoint::List),
            Method::POST => Ok(Endpoint::Create),
            _ => Err(GatewayError::MethodNotAllowed {
                allow: HeaderValue::from_static("GET, POST"),
            }),
        };
    }
    match path.strip_prefix("/v1/api-keys/") {
        Some(id) if !id.is_empty() && !id.contains('/') => match *method {
            Method::DELETE => Ok(Endpoint::Delete(id.to_string())),
            _ => Err(GatewayError::MethodNotAllowed {
                allow: HeaderValue::from_static("DELETE"),
            }),
        },
        _ => Err(GatewayError::NotFound),
    }
}

/// Serves a self-service request.
pub async fn handle(
    req: Request<RequestBody>,
    ctx: &mut RequestCtx,
    cfg: &Config,
    app: &App,
    client_ip: IpAddr,
) -> Result<Response<ResponseBody>, GatewayError> {
    ctx.route = Some(READ_ROUTE.name.clone());
    let ep = endpoint(req.method(), &ctx.path)?;
    let route: &Route = match ep {
        Endpoint::List => &READ_ROUTE,
        Endpoint::Create | Endpoint::Delete(_) => &WRITE_ROUTE,
    };
    let identity = {
        let input = AuthInput {
            headers: req.headers(),
            seen: ctx.seen,
            client_ip,
            route,
        };
        auth::authenticate(&input, cfg, &app.keys).await?
    };
    let caller = identity.key.clone();
    ctx.identity = Some(identity);
    // The caller's plan limits, under the route name `self_service`.
    crate::pipeline::enforce_limits(
        ctx,
        app,
        ROUTE_NAME,
        cfg.plan_limits(caller.plan.as_deref()),
    )
    .await?;

    let actor = Actor {
        kind: "key",
        key_id: Some(&caller.id),
        request_id: ctx.request_id.as_str(),
        peer: client_ip,
    };
    let result = match ep {
        Endpoint::List => match parse_list_query(req.uri().query(), false) {
            Ok(q) => api::list(app, Some(&caller.workspace), &q, &actor).await,
            Err(e) => Err(e),
        },
        Endpoint::Create => {
            let (parts, body) = req.into_parts();
            create(app, cfg, &caller, &parts.headers, body, &actor).await
        }
        Endpoint::Delete(id) => delete(app, &caller, &id, &actor).await,
    };
    Ok(match result {
        Ok(reply) => reply.to_response(),
        Err(e) => e.to_response(ctx.request_id.as_str()),
    })
}

/// 403 FORBIDDEN about one request field.
fn forbidden(field: &str, message: impl Into<String>) -> ApiError {
    let mut e = ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message);
    e.field = Some(field.to_string());
    e
}

/// Creates in one workspace take turns, so that two of them cannot both
/// count the workspace one below the cap and both write. Striped by
/// workspace so that tenants seldom wait on each other, in fixed memory.
static CREATE_GATES: [Mutex<()>; 64] = [const { Mutex::const_new(()) }; 64];

fn create_gate(workspace: &str) -> &'static Mutex<()> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    workspace.hash(&mut h);
    // The modulo keeps the index below the array length.
    &CREATE_GATES[(h.finish() % CREATE_GATES.len() as u64) as usize]
}

async fn create(
    app: &App,
    cfg: &Config,
    caller: &AuthedKey,
    headers: &http::HeaderMap,
    body: RequestBody,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    let bytes = read_body(headers, body).await?;
    let n: NewKey = parse_json(&bytes, false)?;
    let n = confine(caller, n)?;
    // Held across the count and the write: that pair is what must not
    // interleave. Self-service creates are rare; the request path never
    // takes this lock.
    let _turn = create_gate(&caller.workspace).lock().await;
    let cap = cfg.self_service_max_keys;
    if api::count_up_to(app, &caller.workspace, cap, actor).await? >= cap {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "KEY_LIMIT_REACHED",
            format!(
                "this workspace already holds {cap} API keys, the most allowed: revoke one before creating another"
            ),
        ));
    }
    api::create(app, cfg, n, actor).await
}

/// Checks a create request against what the caller holds and fills in what
/// it inherits. Syntax errors are 400 (field named); escalations are 403.
fn confine(caller: &AuthedKey, mut n: NewKey) -> Result<NewKey, ApiError> {
    match &n.workspace {
        Some(w) if **w != *caller.workspace => {
            return Err(forbidden(
                "workspace",
                format!(
                    "workspace: this API key may only create keys in its own workspace {}",
                    caller.workspace
                ),
            ));
        }
        _ => n.workspace = Some(caller.workspace.to_string()),
    }
    // A secret key minting a public key (usable from any origin) or an
    // internal one (for routes it cannot call) would step outside itself.
    match n.kind.as_deref() {
        None => n.kind = Some(caller.kind.to_string()),
        Some(k) if k != &*caller.kind => {
            return Err(forbidden(
                "kind",
                format!(
                    "kind: this API key may only create {} keys, not {k:?}",
                    caller.kind
                ),
            ));
        }
        Some(_) => {}
    }
    ops::check_permissions(&n.permissions)?;
    if let Some(p) = n
        .permissions
        .iter()
        .find(|p| !auth::holds(&caller.permissions, p))
    {
        return Err(forbidden(
            "permissions",
            format!("this API key cannot grant the permission {p}, which it does not hold"),
        ));
    }
    match n.environment.as_deref() {
        None => n.environment = Some(caller.environment.as_str().to_string()),
        Some(e) => match Environment::parse(e) {
            None => {
                return Err(ApiError::invalid(
                    "environment",
                    format!("{e:?}: use live or test"),
                ));
            }
            Some(env) if env != caller.environment => {
                return Err(forbidden(
                    "environment",
                    format!(
                        "environment: this API key may only create {} keys",
                        caller.environment.as_str()
                    ),
                ));
            }
            Some(_) => {}
        },
    }
    match &n.plan {
        None => n.plan = caller.plan.as_deref().map(str::to_string),
        Some(p) if Some(p.as_str()) != caller.plan.as_deref() => {
            return Err(forbidden(
                "plan",
                "plan: this API key may only create keys on its own plan",
            ));
        }
        Some(_) => {}
    }
    if let Some(limit) = caller.expires_at {
        match ops::parse_expiry(n.expires_at.as_deref(), n.expires_in.as_deref())? {
            None => {
                n.expires_at = Some(limit.to_rfc3339());
                n.expires_in = None;
            }
            Some(t) if t > limit => {
                return Err(forbidden(
                    "expires_at",
                    "expires_at: a new key may not outlive the API key that creates it",
                ));
            }
            Some(_) => {}
        }
    }
    if !caller.allowed_ips.is_empty() {
        if n.allowed_ips.is_empty() {
            n.allowed_ips = caller.allowed_ips.iter().map(ToString::to_string).collect();
        } else {
            for net in ops::parse_ips(&n.allowed_ips)? {
                if !caller.allowed_ips.iter().any(|c| c.contains(&net)) {
                    return Err(forbidden(
                        "allowed_ips",
                        format!("allowed_ips: {net} is outside this API key's allowed_ips"),
                    ));
                }
            }
        }
    }
    // Hosts compare case-insensitively, route names exactly (as auth does).
    narrow(
        "allowed_origins",
        &caller.allowed_origins,
        &mut n.allowed_origins,
        |held, w| held.iter().any(|h| h.eq_ignore_ascii_case(w)),
    )?;
    narrow(
        "allowed_routes",
        &caller.allowed_routes,
        &mut n.allowed_routes,
        crate::auth::route_listed,
    )?;
    Ok(n)
}

/// A restricted caller's list is inherited when none is asked for; one asked
/// for must be a subset.
fn narrow(
    field: &str,
    held: &[Box<str>],
    wanted: &mut Vec<String>,
    listed: fn(&[Box<str>], &str) -> bool,
) -> Result<(), ApiError> {
    if held.is_empty() {
        return Ok(());
    }
    if wanted.is_empty() {
        *wanted = held.iter().map(|h| h.to_string()).collect();
        return Ok(());
    }
    match wanted.iter().find(|w| !listed(held, w)) {
        Some(w) => Err(forbidden(
            field,
            format!("{field}: {w:?} is outside this API key's {field}"),
        )),
        None => Ok(()),
    }
}

async fn delete(
    app: &App,
    caller: &AuthedKey,
    id: &str,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    if !plausible_id(id) {
        return Err(ApiError::no_such_key());
    }
    match api::fetch(app, id, actor).await? {
        // Another workspace's key is answered exactly like an unknown one.
        Some(rec) if *rec.workspace == *caller.workspace => {
            may_touch(caller, &rec)?;
            api::revoke(app, &rec, actor).await
        }
        _ => Err(ApiError::no_such_key()),
    }
}

/// A key may act on another key of its workspace only when it holds every
/// permission that key holds: the rule of minting, so that a key can
/// neither make nor take away more than it has.
fn may_touch(caller: &AuthedKey, target: &KeyRecord) -> Result<(), ApiError> {
    match target
        .permissions
        .iter()
        .find(|p| !auth::holds(&caller.permissions, p))
    {
        Some(p) => Err(forbidden(
            "id",
            format!(
                "key {} holds the permission {p}, which this API key does not hold, so it cannot revoke it",
                target.id
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyStatus;
    use crate::time::Timestamp;

    fn caller() -> AuthedKey {
        AuthedKey::new(record())
    }

    fn record() -> KeyRecord {
        KeyRecord {
            id: "key_caller".into(),
            workspace: "ws_a".into(),
            name: String::new(),
            kind: "secret".into(),
            environment: Environment::Live,
            prefix: "sk_live_".into(),
            last4: "abcd".into(),
            permissions: vec!["keys.write".into(), "sms.*".into()],
            plan: Some("gold".into()),
            status: KeyStatus::Active,
            created_at: Timestamp::now(),
            expires_at: None,
            last_used_at: None,
            allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
            allowed_origins: vec![],
            allowed_routes: vec!["sms.send".into(), "self_service".into()],
            metadata: Default::default(),
        }
    }

    fn req(perms: &[&str]) -> NewKey {
        NewKey {
            permissions: perms.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_key_never_grants_more_than_it_holds() {
        let c = caller();
        let n = confine(&c, req(&["sms.send", "sms.*"])).unwrap();
        assert_eq!(n.workspace.as_deref(), Some("ws_a"));
        assert_eq!(n.plan.as_deref(), Some("gold"));
        assert_eq!(n.environment.as_deref(), Some("live"));
        assert_eq!(n.allowed_ips, vec!["10.0.0.0/8".to_string()]);
        assert_eq!(n.allowed_routes, record().allowed_routes);
        for bad in [
            &["balance.read"][..],
            &["*"],
            &["keys.read"],
            &["sms.send", "billing.*"],
        ] {
            let e = confine(&c, req(bad)).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (403, "FORBIDDEN"), "{bad:?}");
        }
        assert_eq!(confine(&c, req(&["sms..x"])).unwrap_err().status, 400);
        let mut n = req(&[]);
        n.workspace = Some("ws_b".into());
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
        let mut n = req(&[]);
        n.environment = Some("test".into());
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
        let mut n = req(&[]);
        n.plan = Some("platinum".into());
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
        let mut n = req(&[]);
        n.allowed_ips = vec!["10.1.0.0/16".into()];
        assert!(confine(&c, n).is_ok());
        let mut n = req(&[]);
        n.allowed_ips = vec!["0.0.0.0/0".into()];
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
        let mut n = req(&[]);
        n.allowed_routes = vec!["balance".into()];
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
    }

    #[test]
    fn the_new_key_is_of_the_callers_kind() {
        let c = caller();
        let n = confine(&c, req(&[])).unwrap();
        assert_eq!(n.kind.as_deref(), Some("secret"));
        let mut n = req(&[]);
        n.kind = Some("secret".into());
        assert!(confine(&c, n).is_ok());
        for other in ["public", "internal", "Secret", ""] {
            let mut n = req(&[]);
            n.kind = Some(other.into());
            let e = confine(&c, n).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (403, "FORBIDDEN"), "{other}");
            assert_eq!(e.field.as_deref(), Some("kind"));
        }
    }

    #[test]
    fn only_keys_holding_no_more_may_be_revoked() {
        let c = caller();
        let mut target = record();
        for (perms, ok) in [
            (&[][..], true),
            (&["sms.send"], true),
            (&["sms.*", "keys.write"], true),
            (&["sms.x.*"], true),
            (&["balance.read"], false),
            (&["sms.send", "keys.read"], false),
            (&["*"], false),
        ] {
            target.permissions = perms.iter().map(|s| s.to_string()).collect();
            match may_touch(&c, &target) {
                Ok(()) => assert!(ok, "{perms:?} allowed"),
                Err(e) => {
                    assert!(!ok, "{perms:?} refused");
                    assert_eq!((e.status.as_u16(), e.code), (403, "FORBIDDEN"));
                }
            }
        }
    }

    #[test]
    fn expiry_is_inherited_and_bounded() {
        let mut c = caller();
        c.expires_at = Some(Timestamp::now().plus(std::time::Duration::from_secs(3600)));
        let n = confine(&c, req(&[])).unwrap();
        assert!(n.expires_at.is_some());
        let mut n = req(&[]);
        n.expires_in = Some("2h".into());
        assert_eq!(confine(&c, n).unwrap_err().status, 403);
        let mut n = req(&[]);
        n.expires_in = Some("10m".into());
        assert!(confine(&c, n).is_ok());
    }

    #[test]
    fn endpoints() {
        assert!(matches!(
            endpoint(&Method::GET, "/v1/api-keys"),
            Ok(Endpoint::List)
        ));
        assert!(matches!(
            endpoint(&Method::POST, "/v1/api-keys"),
            Ok(Endpoint::Create)
        ));
        assert!(matches!(
            endpoint(&Method::DELETE, "/v1/api-keys/key_1"),
            Ok(Endpoint::Delete(_))
        ));
        assert!(matches!(
            endpoint(&Method::PUT, "/v1/api-keys"),
            Err(GatewayError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            endpoint(&Method::GET, "/v1/api-keys/key_1"),
            Err(GatewayError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            endpoint(&Method::DELETE, "/v1/api-keys/a/b"),
            Err(GatewayError::NotFound)
        ));
        assert!(matches!(
            endpoint(&Method::DELETE, "/v1/api-keys/"),
            Err(GatewayError::NotFound)
        ));
    }
}

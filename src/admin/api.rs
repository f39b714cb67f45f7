//! The key operations as HTTP answers, shared by the admin API and the
//! self-service endpoints: each write goes through [`super::ops`], is
//! answered only once the store returned, drops the key from the local
//! cache, and writes exactly one audit line (never with a secret).

use super::http::{ApiError, ListQuery, Reply, record_json};
use super::ops::{self, KeyPatch, NewKey};
use crate::config::Config;
use crate::keys::KeyRecord;
use crate::server::App;
use std::net::IpAddr;
use std::time::Duration;

/// Longest rotation grace period accepted.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Who is making a change, for the audit log.
#[derive(Clone, Copy, Debug)]
pub struct Actor<'a> {
    /// `admin` (admin token) or `key` (self-service).
    pub kind: &'static str,
    /// The calling key's id, for `key`.
    pub key_id: Option<&'a str>,
    /// The request id.
    pub request_id: &'a str,
    /// The client address.
    pub peer: IpAddr,
}

/// One audit line per successful write, on target `portcullis::audit`.
fn audit(actor: &Actor<'_>, action: &'static str, rec: &KeyRecord, detail: &str) {
    tracing::info!(
        target: "portcullis::audit",
        actor = actor.kind,
        actor_key_id = actor.key_id.unwrap_or("-"),
        action,
        key_id = %rec.id,
        workspace = %rec.workspace,
        request_id = actor.request_id,
        peer = %actor.peer,
        detail,
        "key {action}"
    );
}

/// Logs a failed store call (the client only sees a generic message).
fn log_failure(
    actor: &Actor<'_>,
    action: &'static str,
    key_id: &str,
    e: &ApiError,
    cause: &dyn std::fmt::Display,
) {
    // A store outage fails every admin call (and every self-service one).
    static REPEATS: crate::logging::Repeats = crate::logging::Repeats::new(
        |suppressed| tracing::warn!(target: "portcullis::admin", suppressed, "key store call failed: repeats summarised"),
    );
    if e.is_server_side()
        && let Some(suppressed) = REPEATS.admit()
    {
        tracing::warn!(
            target: "portcullis::admin",
            actor = actor.kind,
            action,
            key_id,
            request_id = actor.request_id,
            error = %cause,
            suppressed,
            "key store call failed"
        );
    }
}

fn ops_err(actor: &Actor<'_>, action: &'static str, key_id: &str, e: ops::OpsError) -> ApiError {
    let text = e.to_string();
    let api = ApiError::from(e);
    log_failure(actor, action, key_id, &api, &text);
    api
}

/// `{"data":[…],"next_cursor":…}` for a workspace (or every key).
pub async fn list(
    app: &App,
    workspace: Option<&str>,
    q: &ListQuery,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    let page = app
        .keys
        .store()
        .list(workspace, q.limit, q.cursor.as_deref())
        .await
        .map_err(|e| ops_err(actor, "list", "-", e.into()))?;
    let data: Vec<_> = page.data.iter().map(|r| record_json(r, None)).collect();
    Ok(Reply::ok(
        serde_json::json!({ "data": data, "next_cursor": page.next_cursor }),
    ))
}

/// How many keys `workspace` holds, counted up to `up_to` (a count of
/// `up_to` means "at least"), a page at a time so memory stays bounded.
pub async fn count_up_to(
    app: &App,
    workspace: &str,
    up_to: usize,
    actor: &Actor<'_>,
) -> Result<usize, ApiError> {
    const PAGE: usize = 500;
    let mut seen = 0;
    let mut cursor: Option<String> = None;
    while seen < up_to {
        let page = app
            .keys
            .store()
            .list(Some(workspace), (up_to - seen).min(PAGE), cursor.as_deref())
            .await
            .map_err(|e| ops_err(actor, "count", "-", e.into()))?;
        seen += page.data.len();
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(seen.min(up_to))
}

/// One record, or `None` when unknown.
pub async fn fetch(app: &App, id: &str, actor: &Actor<'_>) -> Result<Option<KeyRecord>, ApiError> {
    app.keys
        .store()
        .get(id)
        .await
        .map_err(|e| ops_err(actor, "get", id, e.into()))
}

/// Creates a key: 201 with the record and its secret.
pub async fn create(
    app: &App,
    cfg: &Config,
    n: NewKey,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    let (rec, secret) = ops::create(app.keys.store(), cfg, n)
        .await
        .map_err(|e| ops_err(actor, "create", "-", e))?;
    // Nothing is cached under a new id yet; kept for the rule "every write invalidates".
    app.keys.invalidate(&rec.id);
    audit(actor, "create", &rec, &rec.permissions.join(","));
    Ok(Reply::created(record_json(&rec, Some(&secret))))
}

/// Patches a key: 200 with the record.
pub async fn patch(
    app: &App,
    cfg: &Config,
    id: &str,
    p: KeyPatch,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    let fields = patch_fields(&p);
    let result = ops::patch(app.keys.store(), cfg, id, p).await;
    // After a store error the write may or may not have happened: drop the
    // cached copy either way.
    app.keys.invalidate(id);
    let rec = result.map_err(|e| ops_err(actor, "patch", id, e))?;
    audit(actor, "patch", &rec, &fields);
    Ok(Reply::ok(record_json(&rec, None)))
}

/// Rotates a key: 200 with the record and its new secret.
pub async fn rotate(
    app: &App,
    cfg: &Config,
    id: &str,
    grace: Duration,
    actor: &Actor<'_>,
) -> Result<Reply, ApiError> {
    let result = ops::rotate(app.keys.store(), cfg, id, grace).await;
    app.keys.invalidate(id);
    let (rec, secret) = result.map_err(|e| ops_err(actor, "rotate", id, e))?;
    audit(
        actor,
        "rotate",
        &rec,
        &format!("grace={}", humantime::format_duration(grace)),
    );
    Ok(Reply::ok(record_json(&rec, Some(&secret))))
}

/// Revokes (deletes) a key already read as `rec`: 204.
pub async fn revoke(app: &App, rec: &KeyRecord, actor: &Actor<'_>) -> Result<Reply, ApiError> {
    let result = ops::revoke(app.keys.store(), &rec.id).await;
    app.keys.invalidate(&rec.id);
    result.map_err(|e| ops_err(actor, "revoke", &rec.id, e))?;
    audit(actor, "revoke", rec, "");
    Ok(Reply::no_content())
}

/// The rotate body: `{"grace":"30s"}` (optional; default no grace).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old secret keeps working (humantime).
    #[serde(default)]
    pub grace: Option<String>,
}

/// Parses and bounds a rotation grace period.
pub fn parse_grace(b: &RotateBody) -> Result<Duration, ApiError> {
    let Some(g) = b.grace.as_deref() else {
        return Ok(Duration::ZERO);
    };
    let d = humantime::parse_duration(g.trim()).map_err(|_| {
        ApiError::invalid(
            "grace",
            format!("{g:?} is not a duration such as 0s, 10m or 1d"),
        )
    })?;
    if d > MAX_GRACE {
        return Err(ApiError::invalid("grace", "must be at most 30d"));
    }
    Ok(d)
}

/// The names of the fields a patch changes, for the audit line.
fn patch_fields(p: &KeyPatch) -> String {
    let mut f = Vec::new();
    let mut add = |present: bool, name: &'static str| {
        if present {
            f.push(name);
        }
    };
    add(p.name.is_some(), "name");
    add(p.permissions.is_some(), "permissions");
    add(p.plan.is_some(), "plan");
    add(p.status.is_some(), "status");
    add(p.expires_at.is_some(), "expires_at");
    add(p.allowed_ips.is_some(), "allowed_ips");
    add(p.allowed_origins.is_some(), "allowed_origins");
    add(p.allowed_routes.is_some(), "allowed_routes");
    add(p.metadata.is_some(), "metadata");
    f.join(",")
}

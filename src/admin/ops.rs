//! Key management operations shared by the admin API, the self-service
//! endpoints and the `portcullis keys` CLI: validate a request, build the
//! record, make the secret, write it to the store. Callers invalidate their
//! caches; the store publishes the change to other instances.

use crate::config::{Config, valid_permission};
use crate::keys::{Environment, KeyRecord, KeyStatus, SharedStore, StoreError, new_key_id};
use crate::time::Timestamp;
use ipnet::IpNet;
use serde::Deserialize;
use std::time::Duration;

/// What can go wrong managing a key.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A field of the request is invalid; nothing was written.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// No key with that id.
    #[error("no key with that id")]
    NotFound,
    /// The store failed; the write may not have happened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> OpsError {
    OpsError::Invalid {
        field,
        message: message.into(),
    }
}

/// A request to create a key (admin body, self-service body, CLI flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Required.
    pub workspace: Option<String>,
    /// A human name.
    #[serde(default)]
    pub name: Option<String>,
    /// Kind from `[key_kinds]` (default `secret`).
    #[serde(default)]
    pub kind: Option<String>,
    /// `live` (default) or `test`.
    #[serde(default)]
    pub environment: Option<String>,
    /// Permissions.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Plan name.
    #[serde(default)]
    pub plan: Option<String>,
    /// RFC 3339 expiry.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Expiry as a duration from now (`30d`).
    #[serde(default)]
    pub expires_in: Option<String>,
    /// CIDRs or addresses.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Hosts.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Route names.
    #[serde(default)]
    pub allowed_routes: Vec<String>,
    /// Free-form JSON object.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// Checks permission syntax.
pub fn check_permissions(perms: &[String]) -> Result<(), OpsError> {
    match perms.iter().find(|p| !valid_permission(p)) {
        Some(p) => Err(invalid(
            "permissions",
            format!("{p:?} is not a permission such as sms.send, sms.* or *"),
        )),
        None => Ok(()),
    }
}

/// Parses `allowed_ips`.
pub fn parse_ips(ips: &[String]) -> Result<Vec<IpNet>, OpsError> {
    ips.iter()
        .map(|s| {
            crate::config::parse_net(s.trim()).ok_or_else(|| {
                invalid("allowed_ips", format!("{s:?} is not an IP address or CIDR"))
            })
        })
        .collect()
}

/// Checks `allowed_origins` entries are hosts (optionally `*.` wildcards).
pub fn check_origins(origins: &[String]) -> Result<(), OpsError> {
    for o in origins {
        let host = o.split_once("://").map(|(_, r)| r).unwrap_or(o);
        let host = host.strip_prefix("*.").unwrap_or(host);
        let ok = !host.is_empty()
            && host.bytes().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']')
            });
        if !ok {
            return Err(invalid(
                "allowed_origins",
                format!("{o:?} is not a host such as app.example.com"),
            ));
        }
    }
    Ok(())
}

/// Parses an expiry given as `expires_at` (RFC 3339) or `expires_in` (duration); must be in the future.
pub fn parse_expiry(at: Option<&str>, within: Option<&str>) -> Result<Option<Timestamp>, OpsError> {
    let t = match (at, within) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "expires_at",
                "give expires_at or expires_in, not both",
            ));
        }
        (Some(a), None) => Some(
            Timestamp::parse(a)
                .ok_or_else(|| invalid("expires_at", format!("{a:?} is not an RFC 3339 time")))?,
        ),
        (None, Some(d)) => {
            let d = humantime::parse_duration(d).map_err(|_| {
                invalid("expires_in", format!("{d:?} is not a duration such as 30d"))
            })?;
            Some(Timestamp::now().plus(d))
        }
        (None, None) => None,
    };
    if let Some(t) = t
        && t <= Timestamp::now()
    {
        let field = if at.is_some() {
            "expires_at"
        } else {
            "expires_in"
        };
        return Err(invalid(field, "the expiry must be in the future"));
    }
    Ok(t)
}

fn check_metadata(
    m: Option<serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, OpsError> {
    match m {
        None | Some(serde_json::Value::Null) => Ok(Default::default()),
        Some(serde_json::Value::Object(o)) => Ok(o),
        Some(_) => Err(invalid("metadata", "must be a JSON object")),
    }
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), OpsError> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be at most {max} characters with no control characters"),
        ));
    }
    Ok(())
}

/// Validates a create request into a record (no id or secret yet).
pub fn build_record(cfg: &Config, n: NewKey) -> Result<KeyRecord, OpsError> {
    let workspace = n
        .workspace
        .filter(|w| !w.trim().is_empty())
        .ok_or_else(|| invalid("workspace", "is required"))?;
    check_text("workspace", &workspace, 128)?;
    let name = n.name.unwrap_or_default();
    check_text("name", &name, 256)?;
    let kind = n.kind.unwrap_or_else(|| "secret".into());
    let environment = match n.environment.as_deref() {
        None => Environment::Live,
        Some(e) => Environment::parse(e)
            .ok_or_else(|| invalid("environment", format!("{e:?}: use live or test")))?,
    };
    let rule = cfg
        .key_format
        .rule(&kind, environment)
        .ok_or_else(|| invalid("kind", format!("{kind:?} is not a key kind in [key_kinds]")))?;
    check_permissions(&n.permissions)?;
    if let Some(p) = &n.plan
        && !cfg.plans.contains_key(p)
    {
        return Err(invalid("plan", format!("{p:?} is not a plan in [plans]")));
    }
    let expires_at = parse_expiry(n.expires_at.as_deref(), n.expires_in.as_deref())?;
    let allowed_ips = parse_ips(&n.allowed_ips)?;
    check_origins(&n.allowed_origins)?;
    Ok(KeyRecord {
        id: new_key_id(),
        workspace,
        name,
        kind,
        environment,
        prefix: rule.prefix.clone(),
        last4: String::new(),
        permissions: n.permissions,
        plan: n.plan,
        status: KeyStatus::Active,
        created_at: Timestamp::now(),
        expires_at,
        last_used_at: None,
        allowed_ips,
        allowed_origins: n.allowed_origins,
        allowed_routes: n.allowed_routes,
        metadata: check_metadata(n.metadata)?,
    })
}

fn last4(secret: &str) -> String {
    secret[secret.len().saturating_sub(4)..].to_string()
}

/// Creates a key; returns the record and its secret (shown this once).
pub async fn create(
    store: &SharedStore,
    cfg: &Config,
    n: NewKey,
) -> Result<(KeyRecord, String), OpsError> {
    let mut rec = build_record(cfg, n)?;
    let (secret, digest) = cfg
        .key_format
        .generate(&rec.kind, rec.environment)
        .ok_or_else(|| invalid("kind", "no prefix configured for this kind and environment"))?;
    rec.last4 = last4(&secret);
    store.create(&rec, &digest).await?;
    Ok((rec, secret))
}

/// Gives a key a new secret; the old one works for `grace` more.
pub async fn rotate(
    store: &SharedStore,
    cfg: &Config,
    id: &str,
    grace: Duration,
) -> Result<(KeyRecord, String), OpsError> {
    let mut rec = store.get(id).await?.ok_or(OpsError::NotFound)?;
    let (secret, digest) = cfg
        .key_format
        .generate(&rec.kind, rec.environment)
        .ok_or_else(|| {
            invalid(
                "kind",
                format!("key kind {:?} is no longer configured", rec.kind),
            )
        })?;
    rec.last4 = last4(&secret);
    if !store.rotate(&rec, &digest, grace).await? {
        return Err(OpsError::NotFound);
    }
    Ok((rec, secret))
}

/// A partial update (admin PATCH); absent fields stay as they are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New permissions (replaces).
    #[serde(default)]
    pub permissions: Option<Vec<String>>,
    /// New plan; JSON null clears it.
    #[serde(default, deserialize_with = "double_option")]
    pub plan: Option<Option<String>>,
    /// `active` or `disabled`.
    #[serde(default)]
    pub status: Option<String>,
    /// New expiry; JSON null clears it.
    #[serde(default, deserialize_with = "double_option")]
    pub expires_at: Option<Option<String>>,
    /// New CIDRs (replaces).
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    /// New origins (replaces).
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    /// New routes (replaces).
    #[serde(default)]
    pub allowed_routes: Option<Vec<String>>,
    /// New metadata (replaces).
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Applies a patch to a record (validated; nothing is written here).
pub fn apply_patch(cfg: &Config, rec: &mut KeyRecord, p: KeyPatch) -> Result<(), OpsError> {
    if let Some(n) = p.name {
        check_text("name", &n, 256)?;
        rec.name = n;
    }
    if let Some(perms) = p.permissions {
        check_permissions(&perms)?;
        rec.permissions = perms;
    }
    if let Some(plan) = p.plan {
        if let Some(pl) = &plan
            && !cfg.plans.contains_key(pl)
        {
            return Err(invalid("plan", format!("{pl:?} is not a plan in [plans]")));
        }
        rec.plan = plan;
    }
    if let Some(s) = p.status {
        rec.status = match s.as_str() {
            "active" => KeyStatus::Active,
            "disabled" => KeyStatus::Disabled,
            other => {
                return Err(invalid(
                    "status",
                    format!("{other:?}: use active or disabled"),
                ));
            }
        };
    }
    if let Some(e) = p.expires_at {
        rec.expires_at = match e {
            None => None,
            Some(s) => parse_expiry(Some(&s), None)?,
        };
    }
    if let Some(ips) = p.allowed_ips {
        rec.allowed_ips = parse_ips(&ips)?;
    }
    if let Some(o) = p.allowed_origins {
        check_origins(&o)?;
        rec.allowed_origins = o;
    }
    if let Some(r) = p.allowed_routes {
        rec.allowed_routes = r;
    }
    if p.metadata.is_some() {
        rec.metadata = check_metadata(p.metadata)?;
    }
    Ok(())
}

/// Reads, patches and writes a key.
pub async fn patch(
    store: &SharedStore,
    cfg: &Config,
    id: &str,
    p: KeyPatch,
) -> Result<KeyRecord, OpsError> {
    let mut rec = store.get(id).await?.ok_or(OpsError::NotFound)?;
    apply_patch(cfg, &mut rec, p)?;
    if !store.update(&rec).await? {
        return Err(OpsError::NotFound);
    }
    Ok(rec)
}

/// Deletes a key.
pub async fn revoke(store: &SharedStore, id: &str) -> Result<(), OpsError> {
    if store.delete(id).await? {
        Ok(())
    } else {
        Err(OpsError::NotFound)
    }
}

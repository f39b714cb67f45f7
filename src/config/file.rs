//! Layer one of the config: the TOML file as plain serde structs. Unknown
//! keys are errors; values that later checks must locate are `Spanned`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Spanned<ServerFile>,
    #[serde(default)]
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub store: Option<StoreFile>,
    #[serde(default)]
    pub cache: Option<CacheFile>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitFile>,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanFile>,
    #[serde(default)]
    pub key_kinds: BTreeMap<String, Spanned<KeyKindFile>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamFile>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteFile>>,
    #[serde(default)]
    pub self_service: Option<SelfServiceFile>,
    #[serde(default)]
    pub log: Option<LogFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub keepalive_timeout: Option<Duration>,
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub http2_max_concurrent_streams: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_path_parameters: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub last_used_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub on_store_error: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    pub sync_interval: Option<Duration>,
    #[serde(default)]
    pub exact_threshold: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    #[serde(default)]
    pub limits: Vec<Spanned<LimitFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitFile {
    pub scope: String,
    pub requests: u64,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyKindFile {
    pub prefixes: PrefixesFile,
    #[serde(default)]
    pub length: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixesFile {
    pub live: String,
    pub test: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub targets: Vec<Spanned<String>>,
    #[serde(default)]
    pub test_targets: Vec<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
    #[serde(default)]
    pub pool_max_idle: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub methods: Option<Spanned<Vec<String>>>,
    pub path: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub key_kinds: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub auth: Option<Spanned<String>>,
    #[serde(default)]
    pub limits: Vec<Spanned<LimitFile>>,
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub websocket: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfServiceFile {
    #[serde(default)]
    pub enabled: bool,
    /// Signed so that 0 and negative values get a message of ours with their position.
    #[serde(default)]
    pub max_keys_per_workspace: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub format: Option<Spanned<String>>,
}

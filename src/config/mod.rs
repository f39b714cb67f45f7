//! Config, in three layers: the TOML file as serde structs (`file`), checked
//! once by [`load`] into the plain runtime types below (durations, CIDRs,
//! parsed URLs, the compiled route table), which the server swaps whole on
//! reload. Every error names the file, line and column.

pub mod file;
pub mod interp;

use crate::keys::Environment;
use crate::keys::format::{
    CHECKSUM_LEN, DEFAULT_RANDOM_LEN, KeyFormat, MAX_KEY_LEN, MIN_RANDOM_LEN, PrefixRule,
};
use crate::router::Router;
use file::*;
use http::{Method, Uri};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Where the config is read from when neither `--config` nor `PORTCULLIS_CONFIG` says.
pub const DEFAULT_PATH: &str = "config/portcullis.toml";

/// Default of `[self_service] max_keys_per_workspace`.
pub const DEFAULT_MAX_KEYS_PER_WORKSPACE: usize = 100;
/// Largest `[self_service] max_keys_per_workspace` accepted: every
/// self-service create counts the workspace's keys up to the cap.
pub const MAX_KEYS_PER_WORKSPACE_LIMIT: usize = 10_000;

/// Default of `[upstreams.*] pool_max_idle`: a ceiling, like a tuned nginx
/// `keepalive`, not a target. A pool grows to a sustained load (see
/// `proxy::pool::TargetPool`) and closes what it no longer needs after
/// `pool_idle_timeout`, so a small load holds few connections and a large
/// one never churns them.
pub const DEFAULT_POOL_MAX_IDLE: usize = 1024;

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a config file, each printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                d.line,
                d.col,
                d.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// TLS certificate chain and private key files (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// `[server]`: the public listener.
#[derive(Clone, Debug)]
pub struct Server {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// TLS files; plain HTTP when absent.
    pub tls: Option<TlsFiles>,
    /// Time allowed to send a request's headers (default 10s).
    pub header_read_timeout: Duration,
    /// Idle keep-alive time between requests (default 60s).
    pub keepalive_timeout: Duration,
    /// Largest request head in bytes (default 16 KiB; 431 past it).
    pub max_header_bytes: usize,
    /// Largest request body in bytes (default 10 MiB; 413 past it), per-route override.
    pub max_body_bytes: u64,
    /// Most open client connections (default 10000); more wait in the accept queue.
    pub max_connections: usize,
    /// Most requests in flight (default 10000); more are shed with 503 OVERLOADED.
    pub max_in_flight: usize,
    /// Worker threads serving the public listener, each with its own event
    /// loop and `SO_REUSEPORT` socket, as nginx workers (default: one per CPU).
    pub workers: usize,
    /// HTTP/2 streams per connection (default 100).
    pub http2_max_concurrent_streams: u32,
    /// How long in-flight requests may run after SIGTERM (default 30s).
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-For` is believed (default none).
    pub trusted_proxies: Vec<IpNet>,
    /// Whether a `;` (path parameters, as Tomcat and Spring read them) may
    /// appear in a request path; routes then match with the parameters in
    /// place. Default false: such a path is refused with 400.
    pub allow_path_parameters: bool,
}

/// `[admin]`: the admin listener.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Address (default `127.0.0.1:9901`).
    pub listen: SocketAddr,
    /// Bearer token; without one, the admin API and `/metrics` refuse every request.
    pub token: Option<String>,
    /// Optional TLS.
    pub tls: Option<TlsFiles>,
    /// Whether `[admin] listen` was written in the file. An explicit address
    /// that cannot be bound stops the gateway; the default one only warns,
    /// so several gateways without `[admin]` can run on one host.
    pub explicit: bool,
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    /// `sqlite://path`, `redis://…`, `redis+cluster://h1:p1,h2:p2`.
    pub url: String,
    /// Bound on every store call (default 500ms).
    pub timeout: Duration,
}

/// `[cache]`: the local key cache.
#[derive(Clone, Copy, Debug)]
pub struct Cache {
    /// How long a found key is trusted (default 30s).
    pub ttl: Duration,
    /// How long an unknown digest is remembered (default 5s).
    pub negative_ttl: Duration,
    /// How long past `ttl` a cached key is served while the store is down (default 5m).
    pub stale_if_error: Duration,
    /// How often `last_used_at` is written, at most once per key (default 60s).
    pub last_used_interval: Duration,
}

/// `[rate_limit] mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitMode {
    /// In-process counters, one node.
    Local,
    /// Exact counters in Redis, one round trip per request.
    Redis,
    /// Local decisions synchronised to Redis in batches; exact near the limit.
    Hybrid,
}

/// `[rate_limit] on_store_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// Fall back to in-process counters.
    Local,
    /// Refuse with 429 and `Retry-After: 1`.
    Deny,
    /// Admit without counting.
    Allow,
}

/// `[rate_limit]`.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitSettings {
    /// Where counters live (default `local`).
    pub mode: RateLimitMode,
    /// What to do when Redis fails (default `local`).
    pub on_store_error: OnStoreError,
    /// Hybrid mode: how often local counts are pushed to Redis (default 50ms).
    pub sync_interval: Duration,
    /// Hybrid mode: fraction of a limit past which decisions go to Redis (default 0.8).
    pub exact_threshold: f64,
    /// Bound on every Redis rate-limit call (default 100ms).
    pub timeout: Duration,
}

/// What a limit counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The key (by id, so rotation keeps counters).
    Key,
    /// The key's whole workspace.
    Workspace,
    /// The key on one route.
    Route,
}

impl Scope {
    /// `key`, `workspace` or `route`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Workspace => "workspace",
            Scope::Route => "route",
        }
    }
}

/// One sliding-window limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// What it counts against.
    pub scope: Scope,
    /// Requests admitted per window.
    pub requests: u64,
    /// Window length (1s to 30d).
    pub per: Duration,
}

/// `[upstreams.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The name.
    pub name: Arc<str>,
    /// Base URLs (scheme and authority), round-robin.
    pub targets: Vec<Uri>,
    /// Where test-environment keys go, if set.
    pub test_targets: Vec<Uri>,
    /// TCP (and TLS) connect timeout (default 1s).
    pub connect_timeout: Duration,
    /// Time allowed until the response headers arrive (default 30s).
    pub request_timeout: Duration,
    /// How long an idle pooled connection is kept (default 90s).
    pub pool_idle_timeout: Duration,
    /// Ceiling on the idle connections kept per target and worker (default
    /// [`DEFAULT_POOL_MAX_IDLE`], like a tuned nginx `keepalive`). Below it a
    /// pool grows to a sustained load; each idle upstream connection holds
    /// ~30 KiB of hyper buffers until `pool_idle_timeout` closes it.
    pub pool_max_idle: usize,
}

/// Whether a route needs a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid key with the route's permissions (default).
    Key,
    /// Forwarded without a key (public endpoints).
    None,
}

/// `[[routes]]`.
#[derive(Clone, Debug)]
pub struct Route {
    /// Unique name, used in metrics, logs and `allowed_routes`.
    pub name: Arc<str>,
    /// Methods; `None` means any.
    pub methods: Option<Vec<Method>>,
    /// The path pattern as written.
    pub path: String,
    /// Upstream name.
    pub upstream: Arc<str>,
    /// Permissions the key must all hold.
    pub permissions: Vec<String>,
    /// Key kinds allowed (default `["secret"]`).
    pub key_kinds: Vec<String>,
    /// Whether a key is needed.
    pub auth: AuthMode,
    /// Extra limits on this route.
    pub limits: Vec<Limit>,
    /// Body size limit for this route.
    pub max_body_bytes: u64,
    /// Whether `Upgrade` (WebSocket) is passed through.
    pub websocket: bool,
}

impl Route {
    /// Whether browser (public) keys may call this route, so it answers CORS.
    pub fn allows_public(&self) -> bool {
        self.key_kinds.iter().any(|k| k == "public")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Clone, Debug)]
pub struct Log {
    /// Filter directive, e.g. `info` (`RUST_LOG` wins when set).
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// Hash of the file's bytes as read, so the reload watcher starts from
    /// exactly what was loaded (a write just after the load is not missed).
    pub source_hash: u64,
    /// `[server]`.
    pub server: Server,
    /// `[admin]`.
    pub admin: Admin,
    /// `[store]`.
    pub store: Store,
    /// `[cache]`.
    pub cache: Cache,
    /// `[rate_limit]`.
    pub rate_limit: RateLimitSettings,
    /// `[plans.*]` (foldhash: a keyed request with a plan looks it up).
    pub plans: HashMap<String, Arc<[Limit]>, foldhash::fast::RandomState>,
    /// `[plans.default]`'s limits, or none: what a key without a plan (or
    /// with a plan since removed) gets, without a lookup per request.
    pub default_plan: Arc<[Limit]>,
    /// Key prefixes from `[key_kinds.*]` (plus the default `secret` and `public`).
    pub key_format: KeyFormat,
    /// `[upstreams.*]`.
    pub upstreams: BTreeMap<String, Upstream>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<Arc<Route>>,
    /// The compiled route table.
    pub router: Router,
    /// `[self_service] enabled`.
    pub self_service: bool,
    /// `[self_service] max_keys_per_workspace`: self-service creates nothing
    /// in a workspace that already holds this many keys.
    pub self_service_max_keys: usize,
    /// `[log]`.
    pub log: Log,
}

impl Config {
    /// The limits a key's plan gives it: its plan, else `[plans.default]`, else none.
    pub fn plan_limits(&self, plan: Option<&str>) -> &[Limit] {
        plan.and_then(|p| self.plans.get(p))
            .unwrap_or(&self.default_plan)
    }
}

/// Reads, interpolates, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        diagnostics: vec![Diagnostic {
            line: 1,
            col: 1,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    parse(path, &text, |k| std::env::var(k).ok())
}

/// Parses and validates config text (`path` is used in messages and to resolve relative paths).
pub fn parse(
    path: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut v = Validator {
        text,
        subs: Vec::new(),
        diags: Vec::new(),
    };
    let (interpolated, subs) = match interp::interpolate_mapped(text, env) {
        Ok(x) => x,
        Err(errs) => {
            for e in errs {
                v.err_at(e.offset, e.message);
            }
            return Err(v.finish(path));
        }
    };
    // Positions found in the interpolated text are mapped back to the file as written.
    v.subs = subs;
    let file: FileConfig = match toml::from_str(&interpolated) {
        Ok(f) => f,
        Err(e) => {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            v.err_at(at, e.message().trim().to_string());
            return Err(v.finish(path));
        }
    };
    match v.config(path, file) {
        Some(mut c) if v.diags.is_empty() => {
            c.source_hash = content_hash(text.as_bytes());
            Ok(c)
        }
        _ => Err(v.finish(path)),
    }
}

struct Validator<'t> {
    /// The file as written.
    text: &'t str,
    /// Substitutions made by `${VAR}` interpolation.
    subs: Vec<interp::Substitution>,
    /// Offsets are in the interpolated text.
    diags: Vec<(usize, String)>,
}

fn dur(d: Option<Duration>, default: &str) -> Duration {
    d.unwrap_or_else(|| humantime::parse_duration(default).unwrap_or(Duration::from_secs(1)))
}

impl Validator<'_> {
    fn err_at(&mut self, offset: usize, message: impl Into<String>) {
        self.diags.push((offset, message.into()));
    }

    fn err<T>(&mut self, s: &Spanned<T>, message: impl Into<String>) {
        self.err_at(s.span().start, message);
    }

    fn finish(mut self, path: &Path) -> ConfigError {
        self.diags.sort_by_key(|d| d.0);
        let diagnostics = self
            .diags
            .iter()
            .map(|(off, msg)| {
                let off = interp::source_offset(&self.subs, *off).min(self.text.len());
                let before = self.text.get(..off).unwrap_or(self.text);
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                Diagnostic {
                    line,
                    col,
                    message: msg.clone(),
                }
            })
            .collect();
        ConfigError {
            file: path.to_path_buf(),
            diagnostics,
        }
    }

    fn addr(&mut self, s: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    s,
                    format!(
                        "{what}: {:?} is not an address such as 0.0.0.0:8443",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn tls(&mut self, t: Option<TlsFile>, base: &Path) -> Option<TlsFiles> {
        let t = t?;
        let mut ok = true;
        let mut resolve = |v: &mut Self, s: &Spanned<String>, what: &str| {
            let p = base.join(s.get_ref());
            if !p.is_file() {
                v.err(s, format!("{what} file {} does not exist", p.display()));
                ok = false;
            }
            p
        };
        let cert = resolve(self, &t.cert, "TLS certificate");
        let key = resolve(self, &t.key, "TLS key");
        ok.then_some(TlsFiles { cert, key })
    }

    fn limit(&mut self, l: &Spanned<LimitFile>, allow_route: bool) -> Option<Limit> {
        let f = l.get_ref();
        let scope = match f.scope.as_str() {
            "key" => Scope::Key,
            "workspace" => Scope::Workspace,
            "route" if allow_route => Scope::Route,
            "route" => {
                self.err(l, "scope \"route\" belongs in a route's limits (a plan's limits are key or workspace)");
                return None;
            }
            other => {
                self.err(
                    l,
                    format!("unknown limit scope {other:?}: use key, workspace or route"),
                );
                return None;
            }
        };
        if f.requests == 0 {
            self.err(l, "requests must be at least 1");
            return None;
        }
        if f.per < Duration::from_secs(1) || f.per > Duration::from_secs(30 * 86400) {
            self.err(l, "per must be between 1s and 30d");
            return None;
        }
        Some(Limit {
            scope,
            requests: f.requests,
            per: f.per,
        })
    }

    fn target(&mut self, s: &Spanned<String>, upstream: &str) -> Option<Uri> {
        let raw = s.get_ref().trim_end_matches('/');
        match raw.parse::<Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none() =>
            {
                Some(u)
            }
            Ok(u) if !matches!(u.scheme_str(), Some("http" | "https")) => {
                self.err(
                    s,
                    format!(
                        "upstream {upstream}: target {:?} must be an http:// or https:// URL",
                        s.get_ref()
                    ),
                );
                None
            }
            _ => {
                self.err(
                    s,
                    format!(
                        "upstream {upstream}: target {:?} must be scheme://host:port with no path",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn config(&mut self, path: &Path, f: FileConfig) -> Option<Config> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // [server]
        let s = f.server.into_inner();
        let listen = self.addr(&s.listen, "server.listen");
        let tls = self.tls(s.tls, &base);
        let mut trusted_proxies = Vec::new();
        for p in &s.trusted_proxies {
            match parse_net(p.get_ref()) {
                Some(n) => trusted_proxies.push(n),
                None => self.err(
                    p,
                    format!(
                        "trusted_proxies: {:?} is not an IP address or CIDR",
                        p.get_ref()
                    ),
                ),
            }
        }
        let server = Server {
            listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            tls,
            header_read_timeout: dur(s.header_read_timeout, "10s"),
            keepalive_timeout: dur(s.keepalive_timeout, "60s"),
            max_header_bytes: s.max_header_bytes.unwrap_or(16 * 1024).max(8192),
            max_body_bytes: s.max_body_bytes.unwrap_or(10 * 1024 * 1024),
            max_connections: s.max_connections.unwrap_or(10_000).max(1),
            max_in_flight: s.max_in_flight.unwrap_or(10_000).max(1),
            workers: s
                .workers
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                })
                .clamp(1, 256),
            http2_max_concurrent_streams: s.http2_max_concurrent_streams.unwrap_or(100).max(1),
            shutdown_grace: dur(s.shutdown_grace, "30s"),
            trusted_proxies,
            allow_path_parameters: s.allow_path_parameters.unwrap_or(false),
        };
        // [admin]
        let a = f.admin.unwrap_or(AdminFile {
            listen: None,
            token: None,
            tls: None,
        });
        let admin_listen = match &a.listen {
            Some(l) => self
                .addr(l, "admin.listen")
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
            None => SocketAddr::from(([127, 0, 0, 1], 9901)),
        };
        let token = a.token.map(Spanned::into_inner).filter(|t| !t.is_empty());
        let admin = Admin {
            listen: admin_listen,
            token,
            tls: self.tls(a.tls, &base),
            explicit: a.listen.is_some(),
        };
        // [store]
        let st = f.store.unwrap_or(StoreFile {
            url: None,
            timeout: None,
        });
        let url = match st.url {
            Some(u) => {
                let raw = u.get_ref();
                if let Some(p) = raw.strip_prefix("sqlite://") {
                    if p.is_empty() {
                        self.err(&u, "store.url: sqlite:// needs a file path");
                    }
                    let p = Path::new(p);
                    let p = if p.is_relative() {
                        base.join(p)
                    } else {
                        p.to_path_buf()
                    };
                    format!("sqlite://{}", p.display())
                } else if raw.starts_with("redis://")
                    || raw.starts_with("rediss://")
                    || raw.starts_with("redis+cluster://")
                {
                    raw.clone()
                } else {
                    self.err(
                        &u,
                        "store.url must start with sqlite://, redis:// or redis+cluster://",
                    );
                    raw.clone()
                }
            }
            None => format!("sqlite://{}", base.join("data/portcullis.db").display()),
        };
        let store = Store {
            url,
            timeout: dur(st.timeout, "500ms"),
        };
        // [cache]
        let c = f.cache.unwrap_or(CacheFile {
            ttl: None,
            negative_ttl: None,
            stale_if_error: None,
            last_used_interval: None,
        });
        let cache = Cache {
            ttl: dur(c.ttl, "30s"),
            negative_ttl: dur(c.negative_ttl, "5s"),
            stale_if_error: dur(c.stale_if_error, "5m"),
            last_used_interval: dur(c.last_used_interval, "60s"),
        };
        // [rate_limit]
        let r = f.rate_limit.unwrap_or(RateLimitFile {
            mode: None,
            on_store_error: None,
            sync_interval: None,
            exact_threshold: None,
            timeout: None,
        });
        let mode = match r.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "local")) => RateLimitMode::Local,
            Some((_, "redis")) => RateLimitMode::Redis,
            Some((_, "hybrid")) => RateLimitMode::Hybrid,
            Some((m, other)) => {
                self.err(
                    m,
                    format!("rate_limit.mode {other:?}: use local, redis or hybrid"),
                );
                RateLimitMode::Local
            }
        };
        if mode != RateLimitMode::Local
            && !store.url.starts_with("redis")
            && let Some(m) = &r.mode
        {
            self.err(
                m,
                "rate_limit.mode redis and hybrid need a redis:// or redis+cluster:// store.url",
            );
        }
        let on_store_error = match r.on_store_error.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "local")) => OnStoreError::Local,
            Some((_, "deny")) => OnStoreError::Deny,
            Some((_, "allow")) => OnStoreError::Allow,
            Some((m, other)) => {
                self.err(
                    m,
                    format!("rate_limit.on_store_error {other:?}: use local, deny or allow"),
                );
                OnStoreError::Local
            }
        };
        let rate_limit = RateLimitSettings {
            mode,
            on_store_error,
            sync_interval: dur(r.sync_interval, "50ms"),
            exact_threshold: r.exact_threshold.unwrap_or(0.8).clamp(0.0, 1.0),
            timeout: dur(r.timeout, "100ms"),
        };
        // [plans.*]
        let mut plans = HashMap::default();
        for (name, p) in &f.plans {
            let limits: Vec<Limit> = p
                .limits
                .iter()
                .filter_map(|l| self.limit(l, false))
                .collect();
            plans.insert(name.clone(), Arc::from(limits));
        }
        // [key_kinds.*], on top of the defaults
        let mut kinds: BTreeMap<String, (String, String, usize)> = BTreeMap::new();
        let dl = DEFAULT_RANDOM_LEN + CHECKSUM_LEN;
        kinds.insert(
            "secret".into(),
            ("sk_live_".into(), "sk_test_".into(), dl + 8),
        );
        kinds.insert(
            "public".into(),
            ("pk_live_".into(), "pk_test_".into(), dl + 8),
        );
        for (name, k) in &f.key_kinds {
            let kf = k.get_ref();
            let longest = kf.prefixes.live.len().max(kf.prefixes.test.len());
            for p in [&kf.prefixes.live, &kf.prefixes.test] {
                if p.is_empty()
                    || !p
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                {
                    self.err(k, format!("key_kinds.{name}: prefix {p:?} must be non-empty letters, digits, _ or -"));
                }
            }
            if kf.prefixes.live == kf.prefixes.test {
                self.err(
                    k,
                    format!("key_kinds.{name}: live and test prefixes must differ"),
                );
            }
            let length = kf.length.unwrap_or(longest + dl);
            if length < longest + MIN_RANDOM_LEN + CHECKSUM_LEN {
                self.err(
                    k,
                    format!(
                        "key_kinds.{name}: length {length} is too short: at least {} for 128 random bits",
                        longest + MIN_RANDOM_LEN + CHECKSUM_LEN
                    ),
                );
            }
            // The key parser refuses anything longer: such keys could never authenticate.
            if length > MAX_KEY_LEN {
                self.err(
                    k,
                    format!("key_kinds.{name}: length {length} is too long: at most {MAX_KEY_LEN}"),
                );
            }
            kinds.insert(
                name.clone(),
                (kf.prefixes.live.clone(), kf.prefixes.test.clone(), length),
            );
        }
        let mut rules = Vec::new();
        for (name, (live, test, length)) in &kinds {
            let kind: Arc<str> = Arc::from(name.as_str());
            rules.push(PrefixRule {
                kind: kind.clone(),
                environment: Environment::Live,
                prefix: live.clone(),
                length: *length,
            });
            rules.push(PrefixRule {
                kind,
                environment: Environment::Test,
                prefix: test.clone(),
                length: *length,
            });
        }
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[i + 1..] {
                if a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix) {
                    let at = f
                        .key_kinds
                        .get(&*a.kind)
                        .or_else(|| f.key_kinds.get(&*b.kind));
                    let msg = format!(
                        "key prefixes {:?} and {:?} overlap: each prefix must name one kind",
                        a.prefix, b.prefix
                    );
                    match at {
                        Some(k) => self.err(k, msg),
                        None => self.err_at(0, msg),
                    }
                }
            }
        }
        let key_format = KeyFormat::new(rules);
        // [upstreams.*]
        let mut upstreams = BTreeMap::new();
        for (name, u) in &f.upstreams {
            let uf = u.get_ref();
            if uf.targets.is_empty() {
                self.err(
                    u,
                    format!("upstream {name}: targets must list at least one URL"),
                );
            }
            let targets = uf
                .targets
                .iter()
                .filter_map(|t| self.target(t, name))
                .collect();
            let test_targets = uf
                .test_targets
                .iter()
                .filter_map(|t| self.target(t, name))
                .collect();
            upstreams.insert(
                name.clone(),
                Upstream {
                    name: Arc::from(name.as_str()),
                    targets,
                    test_targets,
                    connect_timeout: dur(uf.connect_timeout, "1s"),
                    request_timeout: dur(uf.request_timeout, "30s"),
                    pool_idle_timeout: dur(uf.pool_idle_timeout, "90s"),
                    pool_max_idle: uf.pool_max_idle.unwrap_or(DEFAULT_POOL_MAX_IDLE),
                },
            );
        }
        // [[routes]]
        let mut routes = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut spans = Vec::new();
        for r in &f.routes {
            let rf = r.get_ref();
            let name = rf.name.get_ref();
            if name.is_empty() {
                self.err(&rf.name, "route name must not be empty");
            }
            if names.insert(name.clone(), ()).is_some() {
                self.err(&rf.name, format!("route name {name:?} is used twice"));
            }
            if !f.upstreams.contains_key(rf.upstream.get_ref()) {
                self.err(
                    &rf.upstream,
                    format!(
                        "route {name}: upstream {:?} is not defined in [upstreams]",
                        rf.upstream.get_ref()
                    ),
                );
            }
            let methods = match &rf.methods {
                None => None,
                Some(ms) if ms.get_ref().iter().any(|m| m == "*") => None,
                Some(ms) => {
                    let mut out = Vec::new();
                    for m in ms.get_ref() {
                        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                            Ok(mm) => out.push(mm),
                            Err(_) => {
                                self.err(ms, format!("route {name}: {m:?} is not an HTTP method"))
                            }
                        }
                    }
                    if out.is_empty() {
                        self.err(ms, format!("route {name}: methods must not be empty"));
                    }
                    Some(out)
                }
            };
            let key_kinds = match &rf.key_kinds {
                None => vec!["secret".to_string()],
                Some(k) => {
                    for kind in k.get_ref() {
                        if !kinds.contains_key(kind) {
                            self.err(
                                k,
                                format!(
                                    "route {name}: key kind {kind:?} is not defined in [key_kinds]"
                                ),
                            );
                        }
                    }
                    k.get_ref().clone()
                }
            };
            let auth = match rf.auth.as_ref().map(|a| (a, a.get_ref().as_str())) {
                None | Some((_, "key")) => AuthMode::Key,
                Some((_, "none")) => AuthMode::None,
                Some((a, other)) => {
                    self.err(
                        a,
                        format!("route {name}: auth {other:?}: use \"key\" or \"none\""),
                    );
                    AuthMode::Key
                }
            };
            for p in &rf.permissions {
                if !valid_permission(p) {
                    self.err(
                        r,
                        format!(
                            "route {name}: permission {p:?} is not a dotted name such as sms.send"
                        ),
                    );
                }
            }
            let limits = rf
                .limits
                .iter()
                .filter_map(|l| self.limit(l, true))
                .collect();
            if let Err(msg) = crate::router::check_pattern(rf.path.get_ref()) {
                self.err(&rf.path, format!("route {name}: {msg}"));
            }
            spans.push(rf.path.span().start);
            routes.push(Arc::new(Route {
                name: Arc::from(name.as_str()),
                methods,
                path: rf.path.get_ref().clone(),
                upstream: Arc::from(rf.upstream.get_ref().as_str()),
                permissions: rf.permissions.clone(),
                key_kinds,
                auth,
                limits,
                max_body_bytes: rf.max_body_bytes.unwrap_or(server.max_body_bytes),
                websocket: rf.websocket,
            }));
        }
        let router = if self.diags.is_empty() {
            match Router::build(&routes) {
                Ok(r) => r,
                Err((idx, msg)) => {
                    self.err_at(spans.get(idx).copied().unwrap_or(0), msg);
                    return None;
                }
            }
        } else {
            return None;
        };
        // [log]
        let lf = f.log.unwrap_or(LogFile {
            level: None,
            format: None,
        });
        let format = match lf.format.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "human")) => LogFormat::Human,
            Some((_, "json")) => LogFormat::Json,
            Some((m, other)) => {
                self.err(m, format!("log.format {other:?}: use human or json"));
                LogFormat::Human
            }
        };
        // [self_service]
        let ss = f.self_service.unwrap_or(SelfServiceFile {
            enabled: false,
            max_keys_per_workspace: None,
        });
        let self_service_max_keys = match &ss.max_keys_per_workspace {
            None => DEFAULT_MAX_KEYS_PER_WORKSPACE,
            Some(m) => match usize::try_from(*m.get_ref()) {
                Ok(n) if (1..=MAX_KEYS_PER_WORKSPACE_LIMIT).contains(&n) => n,
                _ => {
                    self.err(
                        m,
                        format!(
                            "self_service.max_keys_per_workspace {}: use 1 to {MAX_KEYS_PER_WORKSPACE_LIMIT}",
                            m.get_ref()
                        ),
                    );
                    DEFAULT_MAX_KEYS_PER_WORKSPACE
                }
            },
        };
        Some(Config {
            source: path.to_path_buf(),
            source_hash: 0,
            server,
            admin,
            store,
            cache,
            rate_limit,
            default_plan: plans
                .get("default")
                .cloned()
                .unwrap_or_else(|| Arc::from([])),
            plans,
            key_format,
            upstreams,
            routes,
            router,
            self_service: ss.enabled,
            self_service_max_keys,
            log: Log {
                level: lf.level.unwrap_or_else(|| "info".into()),
                format,
            },
        })
    }
}

/// Hash of a file's bytes (config or TLS file), to notice changes.
pub fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// An IP address (as a /32 or /128) or a CIDR.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A permission is a dotted name (`sms.send`), optionally ending in `.*`, or `*`.
pub fn valid_permission(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let body = p.strip_suffix(".*").unwrap_or(p);
    !body.is_empty()
        && body.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        })
}

#[cfg(test)]
mod tests;

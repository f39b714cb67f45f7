//! The command line: `serve`, `check-config`, `keys …`, `demo`. Parses
//! flags with clap and hands off to the library; prints errors plainly and
//! exits non-zero.

use crate::admin::ops::{self, NewKey, OpsError};
use crate::config::{self, Config, LogFormat};
use crate::keys::{KeyRecord, KeyStatus, SharedStore};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that ignores a closed stdout (`portcullis keys list | head`)
/// instead of panicking.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
use std::time::Duration;

/// portcullis — an API gateway: authenticates every request's API key,
/// checks route permissions and rate limits, and forwards what it allows.
#[derive(Parser, Debug)]
#[command(name = "portcullis", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Config file [default: config/portcullis.toml]
    #[arg(long, short = 'c', env = "PORTCULLIS_CONFIG", global = true)]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway: public listener, admin listener, hot reload.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Log format (overrides [log] format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Check a config file; print every error as file:line:col and exit 1 if any.
    CheckConfig {
        /// The file to check [default: --config, $PORTCULLIS_CONFIG, config/portcullis.toml]
        path: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage API keys directly in the configured store (bootstrap, operations).
    Keys {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: Box<KeysCommand>,
    },
    /// Start a gateway on an embedded store with example SMS and conversations
    /// services, create demo keys, and print curl commands to try.
    Demo {
        /// Gateway port (default 8080, or a free one when 8080 is taken).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Run a small example upstream service (used by the demo and compose).
    #[command(hide = true)]
    ExampleUpstream {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Service name (sms or conversations).
        #[arg(long, default_value = "sms")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key and print its secret (shown this once).
    Create {
        /// Workspace the key belongs to.
        #[arg(long)]
        workspace: String,
        /// Human name.
        #[arg(long)]
        name: Option<String>,
        /// Key kind from [key_kinds] (secret, public, …).
        #[arg(long, default_value = "secret")]
        kind: String,
        /// Environment: live or test.
        #[arg(long = "env", default_value = "live")]
        environment: String,
        /// Permissions, comma-separated (sms.send,sms.read; sms.* and * allowed).
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        /// Plan from [plans].
        #[arg(long)]
        plan: Option<String>,
        /// Expire after this long (e.g. 30d).
        #[arg(long)]
        expires_in: Option<String>,
        /// Allowed client CIDRs, comma-separated.
        #[arg(long, value_delimiter = ',')]
        allowed_ips: Vec<String>,
        /// Allowed browser origins (hosts), comma-separated.
        #[arg(long, value_delimiter = ',')]
        allowed_origins: Vec<String>,
        /// Allowed route names, comma-separated.
        #[arg(long, value_delimiter = ',')]
        allowed_routes: Vec<String>,
        /// Print the record with its secret as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys.
    List {
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show {
        /// Key id (key_…).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable a key (refused with API_KEY_INACTIVE).
    Disable {
        /// Key id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled key.
    Enable {
        /// Key id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a key a new secret (same id); the old one stops working after --grace.
    Rotate {
        /// Key id.
        id: String,
        /// How long the old secret keeps working.
        #[arg(long, default_value = "0s")]
        grace: String,
        /// Print the record with the new secret as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a key for good.
    Revoke {
        /// Key id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, log_format } => serve(config.path(), log_format).await,
        Command::CheckConfig { path, config } => {
            let p = path.unwrap_or_else(|| config.path());
            match config::load(&p) {
                Ok(c) => {
                    say!(
                        "{}: OK ({} routes, {} upstreams)",
                        p.display(),
                        c.routes.len(),
                        c.upstreams.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keys { config, action } => keys(config.path(), *action).await,
        Command::Demo { port } => crate::demo::run(port).await,
        Command::ExampleUpstream { listen, name } => {
            match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => {
                    say!("example {name} service on http://{listen}");
                    crate::demo::example_upstream(l, name).await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(path: PathBuf, log_format: Option<LogFormatArg>) -> ExitCode {
    // Installs the process-wide SIGHUP handler before anything else: until
    // then a SIGHUP (a reload request) would kill the process.
    drop(crate::reload::hangup());
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let format = match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Human) => LogFormat::Human,
        None => cfg.log.format,
    };
    // Held to the end: dropping it writes out the lines still queued.
    let _log = crate::logging::init(format, &cfg.log.level);
    let gw = match crate::server::Gateway::start(cfg).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections; letting in-flight requests finish");
    gw.shutdown().await;
    // Counts of summarised warnings still pending would be lost with the process.
    crate::logging::repeats::flush_all();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn open_store(path: &std::path::Path) -> Result<(Config, SharedStore), String> {
    let cfg = config::load(path).map_err(|e| e.to_string())?;
    let store = crate::keys::open(
        &cfg.store.url,
        cfg.store.timeout.max(Duration::from_secs(2)),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((cfg, store))
}

fn ops_error(e: OpsError) -> String {
    match e {
        OpsError::Invalid { field, message } => format!("--{}: {message}", field.replace('_', "-")),
        OpsError::NotFound => "no key with that id".into(),
        OpsError::Store(e) => e.to_string(),
    }
}

fn print_record(rec: &KeyRecord, secret: Option<&str>, json: bool) {
    if json {
        let mut v = serde_json::to_value(rec).unwrap_or_default();
        if let (Some(s), Some(o)) = (secret, v.as_object_mut()) {
            o.insert("secret".into(), s.into());
        }
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    say!("id           {}", rec.id);
    say!("workspace    {}", rec.workspace);
    if !rec.name.is_empty() {
        say!("name         {}", rec.name);
    }
    say!("kind         {} ({})", rec.kind, rec.environment.as_str());
    say!("key          {}…{}", rec.prefix, rec.last4);
    say!(
        "status       {}",
        if rec.status == KeyStatus::Active {
            "active"
        } else {
            "disabled"
        }
    );
    say!(
        "permissions  {}",
        if rec.permissions.is_empty() {
            "(none)".into()
        } else {
            rec.permissions.join(", ")
        }
    );
    if let Some(p) = &rec.plan {
        say!("plan         {p}");
    }
    say!("created      {}", rec.created_at.to_rfc3339());
    if let Some(t) = rec.expires_at {
        say!("expires      {}", t.to_rfc3339());
    }
    if let Some(t) = rec.last_used_at {
        say!("last used    {}", t.to_rfc3339());
    }
    if let Some(s) = secret {
        say!();
        say!("secret       {s}");
        say!("             (shown once: store it now; it cannot be recovered)");
    }
}

async fn keys(path: PathBuf, action: KeysCommand) -> ExitCode {
    let (cfg, store) = match open_store(&path).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = async {
        match action {
            KeysCommand::Create {
                workspace,
                name,
                kind,
                environment,
                permissions,
                plan,
                expires_in,
                allowed_ips,
                allowed_origins,
                allowed_routes,
                json,
            } => {
                let n = NewKey {
                    workspace: Some(workspace),
                    name,
                    kind: Some(kind),
                    environment: Some(environment),
                    permissions,
                    plan,
                    expires_at: None,
                    expires_in,
                    allowed_ips,
                    allowed_origins,
                    allowed_routes,
                    metadata: None,
                };
                let (rec, secret) = ops::create(&store, &cfg, n).await.map_err(ops_error)?;
                print_record(&rec, Some(&secret), json);
            }
            KeysCommand::List { workspace, json } => {
                let mut all = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let page = store
                        .list(workspace.as_deref(), 500, cursor.as_deref())
                        .await
                        .map_err(|e| e.to_string())?;
                    all.extend(page.data);
                    match page.next_cursor {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
                if json {
                    say!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "data": all }))
                            .unwrap_or_default()
                    );
                } else {
                    say!(
                        "{:<26} {:<16} {:<10} {:<9} {:<18} PERMISSIONS",
                        "ID",
                        "WORKSPACE",
                        "KIND",
                        "STATUS",
                        "KEY"
                    );
                    for r in &all {
                        say!(
                            "{:<26} {:<16} {:<10} {:<9} {:<18} {}",
                            r.id,
                            r.workspace,
                            r.kind,
                            if r.status == KeyStatus::Active {
                                "active"
                            } else {
                                "disabled"
                            },
                            format!("{}…{}", r.prefix, r.last4),
                            r.permissions.join(",")
                        );
                    }
                }
            }
            KeysCommand::Show { id, json } => {
                let rec = store
                    .get(&id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no key with that id")?;
                print_record(&rec, None, json);
            }
            KeysCommand::Disable { id, json } => {
                let p = ops::KeyPatch {
                    status: Some("disabled".into()),
                    ..Default::default()
                };
                let rec = ops::patch(&store, &cfg, &id, p).await.map_err(ops_error)?;
                print_record(&rec, None, json);
            }
            KeysCommand::Enable { id, json } => {
                let p = ops::KeyPatch {
                    status: Some("active".into()),
                    ..Default::default()
                };
                let rec = ops::patch(&store, &cfg, &id, p).await.map_err(ops_error)?;
                print_record(&rec, None, json);
            }
            KeysCommand::Rotate { id, grace, json } => {
                let g = humantime::parse_duration(&grace)
                    .map_err(|_| format!("--grace: {grace:?} is not a duration such as 1h"))?;
                let (rec, secret) = ops::rotate(&store, &cfg, &id, g).await.map_err(ops_error)?;
                print_record(&rec, Some(&secret), json);
            }
            KeysCommand::Revoke { id, json } => {
                ops::revoke(&store, &id).await.map_err(ops_error)?;
                if json {
                    say!("{}", serde_json::json!({ "id": id, "revoked": true }));
                } else {
                    say!("revoked {id}");
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

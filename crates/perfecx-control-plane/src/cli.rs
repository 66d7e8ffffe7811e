//! `perfecx control-plane` and `perfecx keys create`: clap arguments and entry functions.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use perfecx_api::Scope;

use crate::config::{Config, DetectionSettings, Retention, WebSocketSettings};
use crate::ratelimit::{Limit, RateLimits};
use crate::store::{SqliteSync, Store};

/// Runs the control plane: REST API, storage, rate limits and retention.
#[derive(Debug, Clone, Args)]
pub struct ControlPlaneArgs {
    /// Address to listen on.
    #[arg(long, env = "PERFECX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// `sqlite://path` (created if missing) or `postgres://user@host/db`.
    #[arg(long, env = "PERFECX_DATABASE", default_value = "sqlite://perfecx.db")]
    pub database: String,
    /// When SQLite commits reach the disk: `full` survives power loss, `normal` only crashes.
    #[arg(
        long,
        value_enum,
        env = "PERFECX_SQLITE_SYNCHRONOUS",
        default_value = "full"
    )]
    pub sqlite_synchronous: SqliteSync,
    /// Base URL clients reach this server at (for `monitoring_endpoint`).
    #[arg(long, env = "PERFECX_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// How long events are kept, e.g. `30d`, `12h`.
    #[arg(long, env = "PERFECX_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
    /// An active agent silent this long becomes inactive.
    #[arg(long, env = "PERFECX_INACTIVE_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub inactive_after: Duration,
    /// Agent registrations per API key, as `COUNT/PERIOD` (`0` turns a limit off).
    #[arg(long, env = "PERFECX_RATE_REGISTRATION", default_value = "100/1h", value_parser = parse_limit)]
    pub rate_registration: Limit,
    /// Events (counted one by one) per API key or agent token.
    #[arg(long, env = "PERFECX_RATE_EVENTS", default_value = "10000/1m", value_parser = parse_limit)]
    pub rate_events: Limit,
    /// Metrics and anomaly reads per API key.
    #[arg(long, env = "PERFECX_RATE_METRICS", default_value = "1000/1h", value_parser = parse_limit)]
    pub rate_metrics: Limit,
    /// Policy changes (create, update, delete, apply, detach) per API key.
    #[arg(long, env = "PERFECX_RATE_POLICIES", default_value = "100/1h", value_parser = parse_limit)]
    pub rate_policies: Limit,
    /// How often each WebSocket gets a `metrics_update`.
    #[arg(long, env = "PERFECX_WS_METRICS_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub ws_metrics_interval: Duration,
    /// How often the server pings each WebSocket.
    #[arg(long, env = "PERFECX_WS_PING_INTERVAL", default_value = "20s", value_parser = parse_interval)]
    pub ws_ping_interval: Duration,
    /// Messages a WebSocket may fall behind by before its oldest are dropped.
    #[arg(long, env = "PERFECX_WS_BUFFER", default_value = "256", value_parser = clap::value_parser!(u16).range(1..))]
    pub ws_buffer: u16,
}

impl ControlPlaneArgs {
    pub fn config(&self) -> Config {
        Config {
            database_url: self.database.clone(),
            sqlite_sync: self.sqlite_synchronous,
            public_url: self.public_url.clone(),
            admin_key: std::env::var("PERFECX_ADMIN_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            rate_limits: RateLimits {
                registration: self.rate_registration,
                events: self.rate_events,
                metrics: self.rate_metrics,
                policies: self.rate_policies,
            },
            retention: Retention {
                events: self.retention,
                inactive_after: self.inactive_after,
                ..Retention::default()
            },
            websocket: WebSocketSettings {
                metrics_interval: self.ws_metrics_interval,
                ping_interval: self.ws_ping_interval,
                buffer: usize::from(self.ws_buffer),
                ..WebSocketSettings::default()
            },
            detection: DetectionSettings::default(),
        }
    }
}

/// `perfecx control-plane`: serves until Ctrl-C or SIGTERM.
pub async fn control_plane(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    crate::run(listener, args.config(), shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// `perfecx keys ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Mint an API key straight into the database; prints the key once.
    Create(KeysCreateArgs),
}

/// `perfecx control-plane` for a synchronous `main`: runs on its own tokio runtime and turns
/// an error into a message on stderr and exit code 1.
pub fn control_plane_main(args: ControlPlaneArgs) -> std::process::ExitCode {
    // Keeps a subscriber the caller may have installed already.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .try_init();
    block_on(control_plane(args))
}

/// `perfecx keys ...` for a synchronous `main`.
pub fn keys_main(command: KeysCommand) -> std::process::ExitCode {
    match command {
        KeysCommand::Create(args) => block_on(keys_create(args)),
    }
}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let result = match runtime() {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perfecx: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Mints an API key straight into the database (for the first keys, or when locked out).
#[derive(Debug, Clone, Args)]
pub struct KeysCreateArgs {
    #[arg(long, env = "PERFECX_DATABASE", default_value = "sqlite://perfecx.db")]
    pub database: String,
    /// What the key is for, shown in listings.
    #[arg(long)]
    pub name: String,
    /// Comma-separated: read, write, admin.
    #[arg(long, value_delimiter = ',', value_parser = parse_scope, default_value = "read")]
    pub scopes: Vec<Scope>,
}

/// `perfecx keys create`: prints the new key (shown only this once) on stdout.
pub async fn keys_create(args: KeysCreateArgs) -> anyhow::Result<()> {
    let store = Store::connect(&args.database, SqliteSync::Full).await?;
    let created = crate::routes::keys::mint_key(&store, &args.name, &args.scopes)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the key: {e:?}"));
    store.close().await;
    let created = created?;
    let scopes: Vec<&str> = created.scopes.iter().map(|s| s.as_str()).collect();
    eprintln!(
        "created API key {} ({}) with scopes {}; it is shown only this once:",
        created.key_id,
        created.name,
        scopes.join(",")
    );
    println!("{}", created.key);
    Ok(())
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    Scope::parse(text).ok_or_else(|| format!("`{text}` is not a scope; use read, write or admin"))
}

/// `30s`, `5m`, `12h`, `30d`, or plain seconds.
/// The multi-threaded runtime every `perfecx` command runs on. tokio would read
/// `TOKIO_WORKER_THREADS` itself and panic on anything but a plain positive number; it is read
/// leniently here instead, and a value that is no thread count gives one thread per CPU and a
/// warning.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(value) = std::env::var_os("TOKIO_WORKER_THREADS") {
        let threads = thread_count(&value.to_string_lossy()).unwrap_or_else(|| {
            eprintln!(
                "perfecx: TOKIO_WORKER_THREADS is not a positive number ({value:?}); using one thread per CPU"
            );
            std::thread::available_parallelism().map_or(1, |n| n.get())
        });
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

fn thread_count(value: &str) -> Option<usize> {
    value.trim().parse().ok().filter(|&n| n > 0)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 30s, 5m, 12h or 30d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`; use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// A duration of at least one second.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("`{text}`: an interval must be at least 1s")),
        d => Ok(d),
    }
}

/// `COUNT/PERIOD` such as `100/1h` or `10000/1m` (`/h` means `/1h`); `0` for no limit.
pub fn parse_limit(text: &str) -> Result<Limit, String> {
    let (count, period) = text.split_once('/').unwrap_or((text, "1h"));
    let count: u64 = count
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a limit such as 100/1h"))?;
    let period = period.trim();
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(period)?
    } else {
        parse_duration(&format!("1{period}"))?
    };
    if period.is_zero() {
        return Err(format!("`{text}`: the period must not be zero"));
    }
    Ok(Limit::new(count, period))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_read_leniently() {
        assert_eq!(thread_count("3"), Some(3));
        assert_eq!(thread_count(" 1 "), Some(1));
        assert_eq!(thread_count("0"), None);
        assert_eq!(thread_count("many"), None);
    }

    /// The arguments as the `perfecx` binary will mount them.
    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        ControlPlane(ControlPlaneArgs),
        #[command(subcommand)]
        Keys(KeysCommand),
    }

    #[test]
    fn arguments_parse_as_the_cli_mounts_them() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "perfecx",
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "postgres://u@h/db",
            "--rate-events",
            "5/1m",
            "--retention",
            "7d",
            "--ws-metrics-interval",
            "2s",
            "--ws-buffer",
            "64",
        ]);
        let Ok(Cli {
            command: Command::ControlPlane(args),
        }) = cli
        else {
            unreachable!("{cli:?}")
        };
        let config = args.config();
        assert_eq!(config.database_url, "postgres://u@h/db");
        assert_eq!(config.websocket.metrics_interval, Duration::from_secs(2));
        assert_eq!(config.websocket.ping_interval, Duration::from_secs(20));
        assert_eq!(config.websocket.buffer, 64);
        assert_eq!(config.websocket.auth_timeout, Duration::from_secs(10));
        for bad in [
            ["--ws-metrics-interval", "0s"],
            ["--ws-ping-interval", "0"],
            ["--ws-buffer", "0"],
        ] {
            let args = ["perfecx", "control-plane", bad[0], bad[1]];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert_eq!(
            config.rate_limits.events,
            Limit::new(5, Duration::from_secs(60))
        );
        assert_eq!(
            config.rate_limits.registration,
            Limit::new(100, Duration::from_secs(3600))
        );
        assert_eq!(config.retention.events, Duration::from_secs(7 * 86_400));
        let cli = Cli::try_parse_from([
            "perfecx",
            "keys",
            "create",
            "--name",
            "ci",
            "--scopes",
            "read,write",
        ]);
        let Ok(Cli {
            command: Command::Keys(KeysCommand::Create(args)),
        }) = cli
        else {
            unreachable!("{cli:?}")
        };
        assert_eq!(args.scopes, vec![Scope::Read, Scope::Write]);
        assert!(
            Cli::try_parse_from([
                "perfecx", "keys", "create", "--name", "x", "--scopes", "root"
            ])
            .is_err()
        );
    }

    #[test]
    fn durations_and_limits() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(
            parse_limit("100/h"),
            Ok(Limit::new(100, Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_limit("10000/1m"),
            Ok(Limit::new(10_000, Duration::from_secs(60)))
        );
        assert!(parse_limit("many/h").is_err());
        assert!(parse_limit("5/0s").is_err());
    }
}

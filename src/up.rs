//! `perfecx up`: the whole product on embedded defaults, in one process — a control plane on a
//! SQLite file and a sidecar with the shipped policies in front of the demo tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use perfecx_control_plane::ControlPlaneArgs;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::sidecar::Config as SidecarConfig;
use crate::sidecar::cli::{LogFormat, block_on, shutdown_signal};

/// The sidecar `perfecx up` runs without `--sidecar-config`: the shipped policies, and the
/// demo tools (`perfecx demo-tools`, spawned over stdio) as the one upstream.
const DEFAULT_SIDECAR: &str = "\
agent_id: local-agent
listen: 127.0.0.1:15001
admin_listen: 127.0.0.1:15000
policy_dir: policies
upstreams:
  - name: demo
    mcp_command: [perfecx, demo-tools]
";

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    control_plane: ControlPlaneArgs,
    /// A sidecar configuration file; without it, the shipped policies in front of the demo tools.
    #[arg(long)]
    sidecar_config: Option<PathBuf>,
}

pub fn main(args: UpArgs) -> ExitCode {
    crate::sidecar::cli::init_logging(LogFormat::Text);
    let sidecar = match sidecar_config(args.sidecar_config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    block_on(run(args.control_plane, sidecar))
}

fn sidecar_config(path: Option<&std::path::Path>) -> Result<SidecarConfig, String> {
    if let Some(path) = path {
        return SidecarConfig::load(path).map_err(|e| e.to_string());
    }
    let mut config = SidecarConfig::parse("<embedded sidecar configuration>", DEFAULT_SIDECAR)
        .map_err(|e| e.to_string())?;
    // The demo tools are this very binary, wherever it is installed.
    let me =
        std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    for upstream in &mut config.upstreams {
        if let Some(command) = &mut upstream.mcp_command {
            command[0] = me.display().to_string();
        }
    }
    Ok(config)
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

async fn run(control_plane: ControlPlaneArgs, sidecar: SidecarConfig) -> anyhow::Result<()> {
    let api = bind(control_plane.listen).await?;
    let tools = bind(sidecar.listen).await?;
    let admin = bind(sidecar.admin_listen).await?;
    eprintln!(
        "perfecx up:\n  control plane  http://{}/v1  (database {})\n  sidecar        http://{}/mcp/{{upstream}}  (policies in {})\n  metrics        http://{}/metrics",
        control_plane.listen,
        control_plane.database,
        sidecar.listen,
        sidecar.policy_dir.display(),
        sidecar.admin_listen,
    );
    for u in &sidecar.upstreams {
        eprintln!("  upstream       http://{}/mcp/{}", sidecar.listen, u.name);
    }
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let cp =
        perfecx_control_plane::run(api, control_plane.config(), until_stopped(stopped.clone()));
    let sc = crate::sidecar::run(sidecar, tools, admin, until_stopped(stopped));
    let signal = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    };
    tokio::spawn(signal);
    let (cp, sc) = tokio::join!(cp, sc);
    cp?;
    sc?;
    Ok(())
}

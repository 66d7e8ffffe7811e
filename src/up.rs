//! `perfecx up`: the whole product on embedded defaults, in one process — a control plane on a
//! SQLite file and a sidecar with the shipped policies in front of the demo tools, reporting
//! its events to that control plane.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use perfecx_control_plane::ControlPlaneArgs;
use perfecx_control_plane::auth::{AGENT_TOKEN_PREFIX, hash_secret, new_secret};
use perfecx_control_plane::store::{NewAgent, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::sidecar::Config as SidecarConfig;
use crate::sidecar::cli::{LogFormat, block_on, shutdown_signal};
use crate::sidecar::config::ControlPlane as ReportTo;

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
        let config = SidecarConfig::load(path).map_err(|e| e.to_string())?;
        config
            .check_environment(&path.display().to_string())
            .map_err(|e| e.to_string())?;
        return Ok(config);
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

/// The agent `perfecx up`'s sidecar reports as: registered in the control plane's database at
/// the first start, and given a new registration token at every start, since a token is shown
/// only once and this process is its only holder. Returns the token.
async fn provision_agent(
    control_plane: &ControlPlaneArgs,
    agent_id: &str,
) -> anyhow::Result<String> {
    perfecx_api::validate_agent_id(agent_id)
        .map_err(|e| anyhow::anyhow!("the sidecar's agent_id `{agent_id}` {e}"))?;
    let store = Store::connect(&control_plane.database, control_plane.sqlite_synchronous).await?;
    let token = new_secret(AGENT_TOKEN_PREFIX);
    let token_hash = hash_secret(&token);
    let provisioned = match store.set_agent_token_hash(agent_id, &token_hash).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            let mut metadata = serde_json::Map::new();
            metadata.insert("registered_by".into(), "perfecx up".into());
            let agent = NewAgent {
                agent_id: agent_id.to_owned(),
                name: "perfecx up sidecar".into(),
                framework: None,
                version: Some(env!("CARGO_PKG_VERSION").into()),
                capabilities: vec!["tool_use".into()],
                metadata,
                token_hash,
            };
            store.insert_agent(&agent).await.map(drop)
        }
        Err(e) => Err(e),
    };
    store.close().await;
    provisioned.map_err(|e| anyhow::anyhow!("cannot register agent `{agent_id}`: {e}"))?;
    Ok(token)
}

/// Where a client on this host reaches a server listening on `addr`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

async fn run(control_plane: ControlPlaneArgs, mut sidecar: SidecarConfig) -> anyhow::Result<()> {
    let api = bind(control_plane.listen).await?;
    let tools = bind(sidecar.listen).await?;
    let admin = bind(sidecar.admin_listen).await?;
    // A sidecar configuration with its own `control_plane` keeps it; otherwise the sidecar
    // reports to the control plane started here.
    let reports_here = sidecar.control_plane.is_none();
    if reports_here {
        let token = provision_agent(&control_plane, &sidecar.agent_id).await?;
        sidecar.control_plane = Some(ReportTo {
            url: format!("http://{}", reachable(api.local_addr()?)),
            token_env: None,
            spool_dir: Some(PathBuf::from(".perfecx/spool")),
            spool_max_bytes: None,
            bundle_poll_interval_ms: None,
            // Snappy for a demo: events show in the API a fraction of a second after the call.
            flush_interval_ms: Some(200),
            token: Some(token),
        });
    }
    // The bound addresses, not the configured ones: port 0 means "any free port".
    let (api_addr, tools_addr, admin_addr) =
        (api.local_addr()?, tools.local_addr()?, admin.local_addr()?);
    eprintln!(
        "perfecx up:\n  control plane  http://{api_addr}/v1  (database {})\n  sidecar        http://{tools_addr}/mcp/{{upstream}}  (policies in {})\n  metrics        http://{admin_addr}/metrics",
        control_plane.database,
        sidecar.policy_dir.display(),
    );
    for u in &sidecar.upstreams {
        eprintln!("  upstream       http://{tools_addr}/mcp/{}", u.name);
    }
    if reports_here {
        eprintln!(
            "  events         agent `{0}`: http://{api_addr}/v1/agents/{0}/metrics",
            sidecar.agent_id
        );
    }
    // The sidecar stops first: it sends its last events on the way out, so the control plane
    // stops only after it. Either one ending stops the other.
    let stop_sidecar = CancellationToken::new();
    let stop_control_plane = CancellationToken::new();
    let cp = {
        let (stop_sidecar, stop_control_plane) = (stop_sidecar.clone(), stop_control_plane.clone());
        async move {
            let result = perfecx_control_plane::run(api, control_plane.config(), async move {
                stop_control_plane.cancelled().await
            })
            .await;
            stop_sidecar.cancel();
            result
        }
    };
    let sc = {
        let (stop_sidecar, stop_control_plane) = (stop_sidecar.clone(), stop_control_plane.clone());
        async move {
            let result = crate::sidecar::run(sidecar, tools, admin, async move {
                stop_sidecar.cancelled().await
            })
            .await;
            stop_control_plane.cancel();
            result
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        stop_sidecar.cancel();
    });
    let (cp, sc) = tokio::join!(cp, sc);
    cp?;
    sc?;
    Ok(())
}

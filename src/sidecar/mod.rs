//! The sidecar: the agent's tool calls pass through it on their way to the tools.
//!
//! Routes on the tool listener (`listen`):
//! - `/mcp/{name}`: an MCP server (`mcp_url`, or `mcp_command` run by the sidecar) over
//!   Streamable HTTP ([`mcp`])
//! - `/tools/{name}/...`: a plain HTTP tool (`http_url`) ([`http_tool`])
//!
//! The admin listener (`admin_listen`) is described in [`admin`]. Tool traffic is served from
//! one thread per CPU, each with a single-threaded runtime of its own (`serve.rs`); the rest
//! (admin, reloads, reporting, stdio servers) runs on the caller's runtime.
//!
//! A tool call goes through these steps, each in its own module: the host it names
//! ([`origin`], DNS-rebinding protection), the body cap
//! ([`upstream::read_limited`]), the policy check of the call ([`policy_check`]), forwarding
//! under the deadline ([`mcp`], [`http_tool`]), the output filter ([`output_filter`]); refusals
//! are typed ([`denial`]) and turned into answers in one place ([`rescue`]). Policies are
//! loaded and hot-reloaded off the request path ([`policies`], [`reload`]). With a
//! `control_plane`, every execution and violation becomes an event ([`events`]), reported off
//! the request path ([`report`]) and spooled to disk while the control plane is unreachable
//! ([`spool`]); the agent's policy bundle is pulled from it and applied with the files
//! ([`bundle`]).

pub mod admin;
pub mod bundle;
pub mod calls;
pub mod cli;
pub mod config;
pub mod denial;
pub mod events;
pub mod http_tool;
pub mod jsonrpc;
pub mod mcp;
pub mod metrics;
pub mod origin;
pub mod output_filter;
pub mod policies;
pub mod policy_check;
mod pool;
pub mod reload;
pub mod report;
pub mod rescue;
mod serve;
pub mod spool;
pub mod sse;
pub mod stdio;
mod time;
mod unanswered;
pub mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::any;
use futures_util::future::Either;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use calls::Tracker;
pub use config::Config;
use config::UpstreamKind;
use denial::{ForeignHost, Refusal};
use metrics::Metrics;
use origin::HostGuard;
use policies::{Active, Policies};
use report::Reporter;
use upstream::{HttpClient, Transport, Upstream};

/// How long open connections (event streams) may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every request handler shares.
pub struct Shared {
    pub policies: Arc<Policies>,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub max_body_bytes: u64,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Present when events are reported to a control plane.
    pub reporter: Option<Reporter>,
    /// Which hosts requests to the tool listener may name.
    pub hosts: HostGuard,
    /// Requests whose answers an agent may get on a stream it resumes.
    unanswered: unanswered::Unanswered,
}

impl Shared {
    /// The book-keeping of one request's tool calls on `upstream`.
    pub fn tracker(&self, upstream: Arc<str>) -> Tracker {
        Tracker::new(upstream, self.metrics.clone(), self.reporter.clone())
    }

    /// The bytes buffered for one message: the configured cap, lowered by `max_memory_mb`.
    pub fn body_cap(&self, active: Option<&Active>) -> u64 {
        let memory = active
            .and_then(|a| a.set.limits().max_memory_mb.as_ref())
            .map(|l| l.value.saturating_mul(1024 * 1024));
        match memory {
            Some(m) => m.min(self.max_body_bytes),
            None => self.max_body_bytes,
        }
    }
}

/// Runs the sidecar on `listener` (tool traffic) and `admin` until `shutdown` completes.
///
/// The policy directory is loaded before the listeners serve; without a valid set the sidecar
/// still starts, refuses tool calls and reports not ready, and picks the files up as soon as
/// they are fixed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(Metrics::new());
    // Before anything is spawned: a control plane that cannot be reported to is a startup error.
    let reporting = match &config.control_plane {
        Some(settings) => Some(
            report::start(settings, &config.agent_id, metrics.clone())
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    let policies = Arc::new(Policies::new(config.policy_dir.clone(), metrics.clone()));
    let bundles = match &config.control_plane {
        Some(settings) => bundle::source(settings, &config.agent_id)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        None => None,
    };
    if let Some(source) = &bundles {
        bundle::restore(source, &policies).await;
    }
    policies.refresh().await;

    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut upstreams = HashMap::new();
    for u in &config.upstreams {
        let name: Arc<str> = Arc::from(u.name.as_str());
        let kind = u
            .kind()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let transport = match kind {
            UpstreamKind::McpUrl(uri) => Transport::Mcp(uri),
            UpstreamKind::HttpUrl(uri) => Transport::Http(uri),
            UpstreamKind::McpCommand(command) => {
                let max_line = usize::try_from(config.max_body_bytes()).unwrap_or(usize::MAX);
                let (server, task) = stdio::StdioServer::start(
                    name.clone(),
                    command,
                    policies.clone(),
                    max_line,
                    stop.clone(),
                );
                tasks.push(task);
                Transport::Stdio(server)
            }
        };
        upstreams.insert(u.name.clone(), Arc::new(Upstream::new(name, transport)));
    }
    let shared = Arc::new(Shared {
        policies: policies.clone(),
        metrics,
        client: upstream::http_client(),
        max_body_bytes: config.max_body_bytes(),
        upstreams,
        reporter: reporting.as_ref().map(|r| r.reporter.clone()),
        hosts: HostGuard::new(listener.local_addr()?, config.allowed_hosts.as_deref()),
        unanswered: unanswered::Unanswered::default(),
    });
    if !shared.hosts.is_on() {
        tracing::warn!(
            listen = %listener.local_addr()?,
            "the tool listener is not on a loopback address and `allowed_hosts` is not set: the Host and Origin of requests are not checked (DNS-rebinding protection is off)"
        );
    }

    if let Some(source) = bundles {
        let source = Arc::new(source);
        tasks.push(tokio::spawn(bundle::listen(
            source.clone(),
            policies.clone(),
            shared.metrics.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(bundle::poll(
            source,
            policies.clone(),
            stop.clone(),
        )));
    }
    let poll = Duration::from_millis(config.policy_poll_interval_ms.unwrap_or(500).max(50));
    let watch_stop = stop.clone();
    tasks.push(tokio::spawn(reload::watch(policies, poll, async move {
        watch_stop.cancelled().await
    })));

    let admin_hosts = HostGuard::for_admin(admin.local_addr()?, config.allowed_hosts.as_deref());
    tracing::info!(
        agent_id = %config.agent_id,
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        "sidecar serving"
    );
    // As many threads for tool traffic as the runtime has workers: one per CPU, or
    // `TOKIO_WORKER_THREADS` (read where the runtime is built).
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let tools = tokio::spawn(serve::serve_on_workers(
        listener,
        tool_listener(shared.clone()),
        stop.clone(),
        SHUTDOWN_GRACE,
        workers,
    )?);
    let admin = tokio::spawn(serve::serve(
        admin,
        TowerToHyperService::new(admin::router(shared, admin_hosts)),
        stop.clone(),
        SHUTDOWN_GRACE,
    ));
    shutdown.await;
    stop.cancel();
    let _ = tokio::join!(tools, admin);
    for t in tasks {
        let _ = t.await;
    }
    // Last, once no request can record anything more.
    if let Some(reporting) = reporting {
        reporting.shutdown().await;
    }
    Ok(())
}

/// The tool listener's service. A plain HTTP tool call of the usual shape goes straight to its
/// handler: the router's matching, path extraction and boxing cost more than the rest of the
/// sidecar's own code per call. Everything else goes through the router, which answers it as
/// before.
fn tool_listener(
    shared: Arc<Shared>,
) -> impl Service<
    http::Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    let router = TowerToHyperService::new(router(shared.clone()));
    hyper::service::service_fn(move |req: http::Request<Incoming>| {
        if let Err(foreign) = shared.hosts.check(req.headers()) {
            return Either::Left(Either::Left(std::future::ready(Ok(foreign_host(
                req.uri().path(),
                foreign,
            )))));
        }
        match plain_tool_name(req.method(), req.uri().path()) {
            Some(name) => {
                let found = http_upstream(&shared, name).ok_or_else(|| unknown_upstream(name));
                let shared = shared.clone();
                Either::Left(Either::Right(async move {
                    Ok(match found {
                        Ok(up) => http_tool::handle(shared, up, req).await,
                        Err(unknown) => unknown,
                    })
                }))
            }
            None => Either::Right(router.call(req)),
        }
    })
}

/// The answer to a request from a host the listener does not answer to: 403, with a JSON-RPC
/// error on the MCP routes and the plain HTTP tools' error body elsewhere.
fn foreign_host(path: &str, foreign: ForeignHost) -> Response<Body> {
    tracing::warn!(header = foreign.header, value = %foreign.value, path, "request refused: not a host this sidecar answers to");
    let refusal = Refusal::from(foreign);
    if path.starts_with("/mcp/") {
        rescue::json_response(
            rescue::status(&refusal),
            rescue::request_error(None, &refusal),
        )
    } else {
        rescue::http_error(&refusal)
    }
}

/// The tool name of a plain HTTP tool call whose path the router would match as
/// `/tools/{name}`, `/tools/{name}/` or `/tools/{name}/{*rest}` with `name` as sent: not empty,
/// no percent-escapes (the router decodes them). `None` for anything else, and for `HEAD` (the
/// router strips the body of its answer).
fn plain_tool_name<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if method == Method::HEAD {
        return None;
    }
    let after = path.strip_prefix("/tools/")?;
    let name = match after.split_once('/') {
        Some((name, _)) => name,
        None => after,
    };
    (!name.is_empty() && !name.contains('%')).then_some(name)
}

/// The tool listener's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/mcp/{name}", any(mcp_route))
        .route("/tools/{name}", any(tool_route_root))
        .route("/tools/{name}/", any(tool_route_root))
        .route("/tools/{name}/{*rest}", any(tool_route))
        .fallback(|| async {
            rescue::json_response(
                StatusCode::NOT_FOUND,
                r#"{"error":{"code":"not_found","message":"no such route: use /mcp/{name} or /tools/{name}/..."}}"#.into(),
            )
        })
        .with_state(shared)
}

fn unknown_upstream(name: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": "not_found", "message": format!("no upstream named `{name}`")}});
    rescue::json_response(StatusCode::NOT_FOUND, body.to_string())
}

async fn mcp_route(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    req: Request,
) -> Response<Body> {
    match shared.upstreams.get(&name) {
        Some(up) if !matches!(up.transport, Transport::Http(_)) => {
            let up = up.clone();
            mcp::handle(shared, up, req).await
        }
        _ => unknown_upstream(&name),
    }
}

async fn tool_route_root(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    req: Request,
) -> Response<Body> {
    tool(shared, &name, req).await
}

async fn tool_route(
    State(shared): State<Arc<Shared>>,
    Path((name, _)): Path<(String, String)>,
    req: Request,
) -> Response<Body> {
    tool(shared, &name, req).await
}

async fn tool(shared: Arc<Shared>, name: &str, req: Request) -> Response<Body> {
    match http_upstream(&shared, name) {
        Some(up) => http_tool::handle(shared, up, req).await,
        None => unknown_upstream(name),
    }
}

/// The plain HTTP tool named `name`.
fn http_upstream(shared: &Shared, name: &str) -> Option<Arc<Upstream>> {
    shared
        .upstreams
        .get(name)
        .filter(|up| matches!(up.transport, Transport::Http(_)))
        .cloned()
}

/// The path after `/tools/{name}`, as the agent sent it (still percent-encoded: the extracted
/// path parameters are decoded, and forwarding them decoded would change the request).
fn raw_rest(path: &str) -> &str {
    let after = path.strip_prefix("/tools/").unwrap_or("");
    match after.find('/') {
        Some(i) => &after[i..],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::{Method, plain_tool_name, raw_rest};

    #[test]
    fn the_rest_of_a_tool_path_stays_encoded() {
        assert_eq!(raw_rest("/tools/web/a%2Fb/c"), "/a%2Fb/c");
        assert_eq!(raw_rest("/tools/web"), "");
        assert_eq!(raw_rest("/tools/web/"), "/");
    }

    #[test]
    fn only_plain_tool_paths_bypass_the_router() {
        let name = |p| plain_tool_name(&Method::POST, p);
        assert_eq!(name("/tools/web/search"), Some("web"));
        assert_eq!(name("/tools/web"), Some("web"));
        assert_eq!(name("/tools/web//"), Some("web"));
        assert_eq!(name("/tools/web/a%2Fb"), Some("web"));
        assert_eq!(name("/tools/web/"), Some("web"));
        // The router's business: an empty name, escapes in the name, other routes.
        assert_eq!(name("/tools//x"), None);
        assert_eq!(name("/tools/"), None);
        assert_eq!(name("/tools/w%65b/x"), None);
        assert_eq!(name("/mcp/web"), None);
        assert_eq!(name("/toolsweb"), None);
        assert_eq!(plain_tool_name(&Method::HEAD, "/tools/web/x"), None);
    }
}

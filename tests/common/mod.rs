//! Harness for the end-to-end tests: real sockets on 127.0.0.1, port 0.
#![allow(dead_code)]

pub mod control_plane;
pub mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use perfecx::sidecar::{self, Config};
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{
    StreamableHttpClientTransport, StreamableHttpServerConfig, StreamableHttpService,
};
use rmcp::{RoleClient, ServiceExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Generous: the machine is shared with other builds.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub policy_dir: PathBuf,
    running: Running<std::io::Error>,
    _dir: tempfile::TempDir,
}

/// A server spawned in a task that runs until told to stop; told on drop too.
pub struct Running<E> {
    what: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), E>>>,
}

impl<E: std::fmt::Debug + Send + 'static> Running<E> {
    /// Spawns `serve(shutdown)`, where `shutdown` completes when the server is told to stop.
    pub fn spawn<F>(
        what: &'static str,
        serve: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    ) -> Running<E>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(Box::pin(async move {
            let _ = rx.await;
        })));
        Running {
            what,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits until it has, checking that it ended without an error.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .unwrap_or_else(|_| panic!("the {} stops", self.what))
                .unwrap()
                .unwrap();
        }
    }
}

impl<E> Drop for Running<E> {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Sidecar {
    /// Starts a sidecar with `policies` (file name, YAML) and `upstreams` (YAML list items).
    pub async fn start(policies: &[(&str, &str)], upstreams: &str) -> Sidecar {
        Self::start_with(policies, upstreams, "").await
    }

    pub async fn start_with(policies: &[(&str, &str)], upstreams: &str, extra: &str) -> Sidecar {
        Self::start_configured(policies, upstreams, extra, |_| {}).await
    }

    /// [`Sidecar::start_with`], with the parsed configuration adjusted by `configure` (for what
    /// a file cannot hold, such as an in-process registration token).
    pub async fn start_configured(
        policies: &[(&str, &str)],
        upstreams: &str,
        extra: &str,
        configure: impl FnOnce(&mut Config),
    ) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir(&policy_dir).unwrap();
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let yaml = format!(
            "agent_id: test-agent\npolicy_dir: {}\npolicy_poll_interval_ms: 200\n{extra}\nupstreams:\n{upstreams}",
            policy_dir.display()
        );
        let mut config = Config::parse("test.yaml", &yaml).unwrap();
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let running = Running::spawn("sidecar", |shutdown| {
            sidecar::run(config, listener, admin, shutdown)
        });
        Sidecar {
            addr,
            admin: admin_addr,
            policy_dir,
            running,
            _dir: dir,
        }
    }

    pub fn mcp_url(&self, name: &str) -> String {
        format!("http://{}/mcp/{name}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let res = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// Stops the sidecar and waits until it has.
    pub async fn stop(self) {
        self.running.stop().await
    }
}

/// The test tools over Streamable HTTP, answering with JSON bodies or with event streams.
pub async fn mcp_server(json_response: bool) -> (String, CancellationToken) {
    let ct = CancellationToken::new();
    let config = StreamableHttpServerConfig::default()
        .with_json_response(json_response)
        .with_sse_keep_alive(None)
        .with_cancellation_token(ct.child_token());
    let service: StreamableHttpService<tools::TestTools, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(tools::TestTools::new()), Default::default(), config);
    let router = axum::Router::new().nest_service("/mcp", service);
    let url = serve(router, ct.clone()).await;
    (format!("{url}/mcp"), ct)
}

/// Serves `router` on a fresh port until `ct` is cancelled; returns `http://addr`.
pub async fn serve(router: axum::Router, ct: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { ct.cancelled_owned().await })
            .await;
    });
    format!("http://{addr}")
}

pub type Client = RunningService<RoleClient, ClientConfig>;

pub async fn client(url: &str) -> Client {
    let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
    ClientConfig::default().serve(transport).await.unwrap()
}

pub async fn call(client: &Client, tool: &str, args: serde_json::Value) -> CallToolResult {
    let args = match args {
        serde_json::Value::Object(m) => m,
        _ => panic!("arguments must be an object"),
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .unwrap()
}

/// The text of a result's content.
pub fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn is_error(result: &CallToolResult) -> bool {
    result.is_error == Some(true)
}

/// Polls `check` until it holds; panics after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a file atomically (as editors and ConfigMaps do), so a reload never sees half of it.
pub fn write_policy(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The value of a metric line that starts with `prefix`, if present.
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub const SAFETY: &str = r#"
name: safety
enforcement: strict
rules:
  - type: tool_restriction
    forbidden_tools: [shell, crash_not_used]
  - type: content_filter
    forbidden_patterns: ["rm -rf", "DROP TABLE"]
    sensitive_data_detection: true
"#;

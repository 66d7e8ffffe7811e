//! Policy bundles from the control plane, applied alongside the policy files
//! ([`Policies::set_bundle`]). The control plane pushes each new bundle over its WebSocket
//! (`/agents/{agent_id}`, subscribed to `policy_bundle` alone), so that a change takes effect
//! at once; `GET {url}/v1/agents/{agent_id}/policy-bundle`, polled every
//! `bundle_poll_interval_ms` with `If-None-Match`, catches whatever the socket missed (while it
//! was down, or when the control plane says it dropped messages).
//!
//! A bundle is applied whole, and only when every document in it is a valid policy and the
//! names are unique; otherwise the last good bundle stays in force, and `/policies` and
//! `perfecx_policy_synchronized` say why (fail closed: a bad bundle never loosens what is
//! enforced). The last good bundle is kept in `{spool_dir}/policy-bundle.json`, so that a
//! restart while the control plane is unreachable enforces it from the start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use perfecx_api::{ClientMessage, ErrorBody, PolicyBundle, ServerMessage, Topic};
use perfecx_policy::{PolicySet, parse_policy};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::config::ControlPlane;
use super::metrics::Metrics;
use super::policies::{Bundle, BundledPolicy, Policies};
use super::upstream::{HttpClient, describe_client_error, http_client};

/// A bundle larger than this is refused.
const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CACHE_FILE: &str = "policy-bundle.json";
/// The control plane pings every 20 s: a socket silent for longer than this is dead.
const SOCKET_SILENCE: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where bundles come from, and how often they are asked for.
pub struct Source {
    uri: Uri,
    /// The WebSocket that pushes them: `ws://.../agents/{agent_id}`.
    socket: String,
    token: String,
    authorization: HeaderValue,
    client: HttpClient,
    interval: Duration,
    cache: PathBuf,
    /// Asks the poller to fetch at once: the socket lost messages.
    fetch_now: Notify,
    /// Held while a bundle is applied; holds the last refusal logged, so that a bad bundle is
    /// logged once however it comes.
    applying: tokio::sync::Mutex<Option<String>>,
    /// Bundles pushed so far: a fetch that saw a push arrive while it was on its way is older.
    /// (Revisions are content hashes and can come back, so they cannot tell.)
    pushed: AtomicU64,
}

/// The source `settings` describe; `None` when pulling is turned off.
pub fn source(settings: &ControlPlane, agent_id: &str) -> Result<Option<Source>, String> {
    let Some(interval) = settings.bundle_poll_interval() else {
        return Ok(None);
    };
    let base = settings.base_uri()?;
    let url = format!(
        "{}/v1/agents/{agent_id}/policy-bundle",
        base.to_string().trim_end_matches('/')
    );
    let uri = url
        .parse()
        .map_err(|e| format!("cannot make the policy bundle URL `{url}`: {e}"))?;
    // The URL is checked to be `http://`, so the socket is `ws://`.
    let socket = format!(
        "ws{}/agents/{agent_id}",
        base.to_string()
            .trim_end_matches('/')
            .trim_start_matches("http")
    );
    let token = settings.token()?;
    let authorization = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        "the registration token holds characters not allowed in a header".to_owned()
    })?;
    Ok(Some(Source {
        uri,
        socket,
        token,
        authorization,
        client: http_client(),
        interval,
        cache: settings.spool_dir().join(CACHE_FILE),
        fetch_now: Notify::new(),
        applying: tokio::sync::Mutex::new(None),
        pushed: AtomicU64::new(0),
    }))
}

/// Checks a bundle: every document a valid policy, and the set compilable on its own.
pub fn check(bundle: PolicyBundle) -> Result<Bundle, String> {
    let mut policies = Vec::with_capacity(bundle.policies.len());
    let mut problems = Vec::new();
    for p in bundle.policies {
        let source = format!("control plane policy {} v{}", p.policy_id, p.version);
        let text = serde_json::to_string(&p.document).map_err(|e| e.to_string())?;
        match parse_policy(&source, &text) {
            Ok(policy) => policies.push(BundledPolicy {
                policy_id: p.policy_id,
                version: p.version,
                policy,
            }),
            Err(d) => problems.push(d.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    PolicySet::compile(policies.iter().map(|p| p.policy.clone()).collect())
        .map_err(|d| d.to_string())?;
    Ok(Bundle {
        revision: bundle.revision,
        policies,
    })
}

/// Applies the bundle kept by an earlier run, if there is a good one.
pub async fn restore(source: &Source, policies: &Policies) {
    let path = source.cache.clone();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&path)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return,
        Ok(Err(e)) => {
            tracing::error!(file = %source.cache.display(), error = %e, "cannot read the kept policy bundle");
            return;
        }
        Err(_) => return,
    };
    let checked = serde_json::from_slice::<PolicyBundle>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(check);
    match checked {
        Ok(bundle) => {
            tracing::info!(revision = %bundle.revision, "applying the policy bundle kept by an earlier run");
            policies.set_bundle(bundle).await;
        }
        Err(e) => {
            tracing::error!(file = %source.cache.display(), error = %e, "the kept policy bundle is not valid; ignored")
        }
    }
}

/// Polls for bundles until `stop`.
pub async fn poll(source: Arc<Source>, policies: Arc<Policies>, stop: CancellationToken) {
    // The last problem logged, so that one that lasts is logged once.
    let mut problem: Option<String> = None;
    loop {
        // Asked for as of the bundle in force, whichever way it came.
        let pushed = source.pushed.load(Ordering::Acquire);
        let etag = policies
            .bundle_revision()
            .and_then(|r| HeaderValue::from_str(&format!("\"{r}\"")).ok());
        match fetch(&source, etag.as_ref()).await {
            Ok(Fetched::Unchanged) => {
                if problem.take().is_some() {
                    tracing::info!("policy bundles can be fetched again");
                }
            }
            Ok(Fetched::Bundle(bundle, raw)) => {
                problem = None;
                let mut refused = source.applying.lock().await;
                // A bundle pushed while this one was on its way is newer: it stays.
                if source.pushed.load(Ordering::Acquire) == pushed {
                    apply(&source, &policies, bundle, raw, &mut refused).await;
                }
            }
            Err(e) => {
                if problem.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot fetch the policy bundle; the last good set stays in force");
                }
                problem = Some(e);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(source.interval) => {}
            _ = source.fetch_now.notified() => {}
        }
    }
}

/// Checks `bundle`, keeps it on disk (`raw`, its bytes) and applies it; or logs why not, once
/// for a refusal that lasts (`refused`, the last one logged).
async fn apply(
    source: &Source,
    policies: &Policies,
    bundle: PolicyBundle,
    raw: Bytes,
    refused: &mut Option<String>,
) {
    let revision = bundle.revision.clone();
    match check(bundle) {
        Ok(bundle) => {
            *refused = None;
            let count = bundle.policies.len();
            keep(&source.cache, raw).await;
            if policies.set_bundle(bundle).await {
                tracing::info!(%revision, policies = count, "policy bundle applied");
            } else if let Some(error) = policies.report().error {
                tracing::error!(%revision, error = %error, "the policy bundle and the policy files do not compile together; the last good set stays in force");
            }
        }
        Err(e) => {
            if refused.as_deref() != Some(e.as_str()) {
                tracing::error!(%revision, error = %e, "policy bundle refused; the last good set stays in force");
                policies.bundle_refused(format!("bundle {revision}: {e}"));
            }
            *refused = Some(e);
        }
    }
}

/// Takes the bundles the control plane pushes over its WebSocket until `stop`, connecting
/// again with backoff when the socket fails or closes (polling goes on meanwhile).
pub async fn listen(
    source: Arc<Source>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    // The last reason the socket ended, so that one that lasts is logged once.
    let mut ended: Option<String> = None;
    loop {
        let (reason, served) = tokio::select! {
            _ = stop.cancelled() => return,
            ended = session(&source, &policies, &metrics) => ended,
        };
        metrics.bundle_socket.set(0);
        if served {
            backoff = FIRST_BACKOFF;
            ended = None;
        }
        // Jitter, so that a fleet does not come back all at once after a control plane restart.
        let wait = backoff.mul_f64(rand::random_range(0.5..1.0));
        if ended.as_deref() != Some(reason.as_str()) {
            tracing::warn!(reason = %reason, retry_in_ms = wait.as_millis() as u64, "policy bundles are not pushed by the control plane's WebSocket; polling goes on");
        }
        ended = Some(reason);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection to the control plane's WebSocket: why it ended, and whether it delivered
/// any bundle (then the next failure is news, and the backoff starts over).
async fn session(source: &Source, policies: &Policies, metrics: &Metrics) -> (String, bool) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_BUNDLE_BYTES))
        .max_frame_size(Some(MAX_BUNDLE_BYTES));
    let connect =
        tokio_tungstenite::connect_async_with_config(source.socket.as_str(), Some(config), true);
    let mut socket = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(e)) => return (format!("cannot connect: {e}"), false),
        Err(_) => {
            let reason = format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
            return (reason, false);
        }
    };
    let auth = ClientMessage::Auth {
        token: source.token.clone(),
        subscribe: Some(vec![Topic::PolicyBundle]),
    };
    let auth = serde_json::to_string(&auth).unwrap_or_default();
    if let Err(e) = socket.send(Message::text(auth)).await {
        return (format!("cannot authenticate: {e}"), false);
    }
    let mut served = false;
    loop {
        let message = match tokio::time::timeout(SOCKET_SILENCE, socket.next()).await {
            Err(_) => {
                let reason = format!("nothing heard for {} s", SOCKET_SILENCE.as_secs());
                return (reason, served);
            }
            Ok(None) => return ("the control plane closed the connection".into(), served),
            Ok(Some(Err(e))) => return (format!("the connection broke off: {e}"), served),
            Ok(Some(Ok(message))) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let reason = match frame {
                    Some(f) => format!("closed by the control plane ({}): {}", f.code, f.reason),
                    None => "closed by the control plane".into(),
                };
                return (reason, served);
            }
            // Pings are answered by the library as it reads.
            _ => continue,
        };
        match serde_json::from_str::<ServerMessage>(text.as_str()) {
            Ok(ServerMessage::PolicyBundle(bundle)) => {
                if !served {
                    served = true;
                    metrics.bundle_socket.set(1);
                    tracing::info!("policy bundles are pushed by the control plane as they change");
                }
                let mut refused = source.applying.lock().await;
                source.pushed.fetch_add(1, Ordering::AcqRel);
                // The bundle in force comes first on every connection: nothing to do.
                if policies.bundle_revision().as_deref() == Some(bundle.revision.as_str()) {
                    continue;
                }
                let raw = serde_json::to_vec(&bundle)
                    .map(Bytes::from)
                    .unwrap_or_default();
                apply(source, policies, bundle, raw, &mut refused).await;
            }
            // Messages were dropped, a bundle among them perhaps: fetch it.
            Ok(ServerMessage::Lagged { .. }) => source.fetch_now.notify_one(),
            // Only bundles were asked for; a newer control plane may send more.
            Ok(_) | Err(_) => {}
        }
    }
}

enum Fetched {
    Unchanged,
    /// The bundle and its bytes (kept on disk once checked).
    Bundle(PolicyBundle, Bytes),
}

async fn fetch(source: &Source, etag: Option<&HeaderValue>) -> Result<Fetched, String> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = source.uri.clone();
    let headers = req.headers_mut();
    headers.insert(header::AUTHORIZATION, source.authorization.clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(etag) = etag {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let res = source
            .client
            .request(req)
            .await
            .map_err(|e| describe_client_error(&e))?;
        let status = res.status();
        let body = Limited::new(res.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("cannot read the bundle: {e}"))?;
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))??;
    let (status, body) = answer;
    match status {
        StatusCode::NOT_MODIFIED => Ok(Fetched::Unchanged),
        StatusCode::OK => {
            let bundle = serde_json::from_slice::<PolicyBundle>(&body)
                .map_err(|e| format!("the bundle is not a policy bundle: {e}"))?;
            Ok(Fetched::Bundle(bundle, body))
        }
        status => {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
            Err(format!("the control plane answered {status}: {message}"))
        }
    }
}

/// Keeps a checked bundle on disk, atomically.
async fn keep(path: &Path, bytes: Bytes) {
    let path = path.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await;
    if let Ok(Err(e)) = written {
        tracing::error!(error = %e, "cannot keep the policy bundle on disk; a restart without the control plane will not have it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perfecx_api::BundledPolicy as Wire;
    use serde_json::json;

    fn bundle(documents: Vec<serde_json::Value>) -> PolicyBundle {
        PolicyBundle {
            agent_id: "a".into(),
            revision: "r1".into(),
            policies: documents
                .into_iter()
                .enumerate()
                .map(|(i, document)| Wire {
                    policy_id: format!("pol_{i}"),
                    version: 1,
                    document,
                })
                .collect(),
        }
    }

    #[test]
    fn a_bad_bundle_is_refused_with_reasons() {
        let good = json!({"name": "cp", "rules": [{"type": "tool_restriction", "forbidden_tools": ["shell"]}]});
        assert_eq!(check(bundle(vec![good.clone()])).unwrap().policies.len(), 1);
        assert!(check(bundle(vec![])).unwrap().policies.is_empty());

        let unknown = json!({"name": "x", "rules": [{"type": "teleport"}]});
        let e = check(bundle(vec![good.clone(), unknown])).unwrap_err();
        assert!(e.contains("control plane policy pol_1 v1"), "{e}");
        let e = check(bundle(vec![good.clone(), good])).unwrap_err();
        assert!(e.contains("duplicate policy name"), "{e}");
        let e = check(bundle(vec![json!("not an object")])).unwrap_err();
        assert!(!e.is_empty());
    }

    #[tokio::test]
    async fn a_bundle_that_clashes_with_a_file_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("local.yaml"),
            "name: local\nrules:\n  - type: tool_restriction\n    forbidden_tools: [shell]\n",
        )
        .unwrap();
        let metrics = Arc::new(super::super::metrics::Metrics::new());
        let policies = Policies::new(dir.path().to_owned(), metrics);
        assert!(policies.refresh().await);
        let cp = json!({"name": "cp", "rules": [{"type": "tool_restriction", "forbidden_tools": ["echo"]}]});
        assert!(policies.set_bundle(check(bundle(vec![cp])).unwrap()).await);
        let names = |p: &Policies| -> Vec<String> {
            p.current()
                .unwrap()
                .set
                .policies()
                .iter()
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(names(&policies), ["local", "cp"]);

        let clash = json!({"name": "local", "rules": [{"type": "tool_restriction", "forbidden_tools": ["add"]}]});
        let mut b = check(bundle(vec![clash])).unwrap();
        b.revision = "r2".into();
        assert!(!policies.set_bundle(b).await);
        assert_eq!(names(&policies), ["local", "cp"], "the last good set stays");
        let report = policies.report();
        assert!(!report.synchronized);
        assert!(report.error.unwrap().contains("duplicate policy name"));
    }
}

//! Policy bundles pulled from the control plane: `GET {url}/v1/agents/{agent_id}/policy-bundle`,
//! polled (every `bundle_poll_interval_ms`) with `If-None-Match`, and applied alongside the
//! policy files ([`Policies::set_bundle`]).
//!
//! A bundle is applied whole, and only when every document in it is a valid policy and the
//! names are unique; otherwise the last good bundle stays in force, and `/policies` and
//! `perfecx_policy_synchronized` say why (fail closed: a bad bundle never loosens what is
//! enforced). The last good bundle is kept in `{spool_dir}/policy-bundle.json`, so that a
//! restart while the control plane is unreachable enforces it from the start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use perfecx_api::{ErrorBody, PolicyBundle};
use perfecx_policy::{PolicySet, parse_policy};
use tokio_util::sync::CancellationToken;

use super::config::ControlPlane;
use super::policies::{Bundle, BundledPolicy, Policies};
use super::upstream::{HttpClient, describe_client_error, http_client};

/// A bundle larger than this is refused.
const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CACHE_FILE: &str = "policy-bundle.json";

/// Where bundles come from, and how often they are asked for.
pub struct Source {
    uri: Uri,
    authorization: HeaderValue,
    client: HttpClient,
    interval: Duration,
    cache: PathBuf,
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
    let token = settings.token()?;
    let authorization = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        "the registration token holds characters not allowed in a header".to_owned()
    })?;
    Ok(Some(Source {
        uri,
        authorization,
        client: http_client(),
        interval,
        cache: settings.spool_dir().join(CACHE_FILE),
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
pub async fn poll(source: Source, policies: Arc<Policies>, stop: CancellationToken) {
    let mut etag = policies
        .bundle_revision()
        .and_then(|r| HeaderValue::from_str(&format!("\"{r}\"")).ok());
    // The last problem logged, so that one that lasts is logged once.
    let mut problem: Option<String> = None;
    loop {
        match fetch(&source, etag.as_ref()).await {
            Ok(Fetched::Unchanged) => {
                if problem.take().is_some() {
                    tracing::info!("policy bundles can be fetched again");
                }
            }
            Ok(Fetched::Bundle(bundle, new_etag, raw)) => {
                let revision = bundle.revision.clone();
                match check(bundle) {
                    Ok(bundle) => {
                        problem = None;
                        let count = bundle.policies.len();
                        keep(&source.cache, raw).await;
                        if policies.set_bundle(bundle).await {
                            tracing::info!(%revision, policies = count, "policy bundle applied");
                        } else if let Some(error) = policies.report().error {
                            tracing::error!(%revision, error = %error, "the policy bundle and the policy files do not compile together; the last good set stays in force");
                        }
                        etag = new_etag;
                    }
                    Err(e) => {
                        if problem.as_deref() != Some(e.as_str()) {
                            tracing::error!(%revision, error = %e, "policy bundle refused; the last good set stays in force");
                            policies.bundle_refused(format!("bundle {revision}: {e}"));
                        }
                        problem = Some(e);
                    }
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
        }
    }
}

enum Fetched {
    Unchanged,
    /// The bundle, its `ETag`, and its bytes (kept on disk once checked).
    Bundle(PolicyBundle, Option<HeaderValue>, Bytes),
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
        let etag = res.headers().get(header::ETAG).cloned();
        let body = Limited::new(res.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("cannot read the bundle: {e}"))?;
        Ok::<_, String>((status, etag, body))
    })
    .await
    .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))??;
    let (status, etag, body) = answer;
    match status {
        StatusCode::NOT_MODIFIED => Ok(Fetched::Unchanged),
        StatusCode::OK => {
            let bundle = serde_json::from_slice::<PolicyBundle>(&body)
                .map_err(|e| format!("the bundle is not a policy bundle: {e}"))?;
            Ok(Fetched::Bundle(bundle, etag, body))
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

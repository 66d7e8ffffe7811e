//! The loaded policy set, swapped whole on reload, and its load status.
//!
//! Compilation happens off the request path (on a blocking thread); requests take an `Arc` of
//! whatever set is current, so a reload never fails or stalls a request in flight. A bad file
//! keeps the last good set. With no valid, non-empty set the sidecar fails closed.
//!
//! The set is compiled from the policy files and, with a control plane, the last good policy
//! bundle pulled from it ([`super::bundle`]): both apply, as policies of one set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use perfecx_policy::{Diagnostics, Policy, PolicySet};
use serde::Serialize;

use super::metrics::Metrics;
use super::time::rfc3339;
use crate::policy_files::{self, LoadedFile};

/// A compiled set in force, and where it came from.
pub struct Active {
    pub set: PolicySet,
    pub files: Vec<LoadedFile>,
    /// The bundle compiled into the set, if any.
    pub bundle: Option<Arc<Bundle>>,
    pub loaded_at: SystemTime,
}

/// A policy bundle from the control plane, parsed and checked: every document valid, the
/// names unique.
#[derive(Debug)]
pub struct Bundle {
    pub revision: String,
    pub policies: Vec<BundledPolicy>,
}

#[derive(Debug)]
pub struct BundledPolicy {
    pub policy_id: String,
    pub version: i64,
    pub policy: Policy,
}

#[derive(Default)]
struct Status {
    /// Fingerprint of the files (and bundle) last tried, loaded or not: unchanged sources are
    /// not recompiled.
    fingerprint: Option<u64>,
    error: Option<String>,
    attempted_at: Option<SystemTime>,
    /// Why the newest bundle from the control plane was not applied.
    bundle_error: Option<String>,
}

pub struct Policies {
    dir: PathBuf,
    current: ArcSwapOption<Active>,
    status: Mutex<Status>,
    metrics: Arc<Metrics>,
    /// Serialises reloads (watcher and poller may race).
    reload_lock: tokio::sync::Mutex<()>,
    /// The last good bundle from the control plane.
    bundle: Mutex<Option<Arc<Bundle>>>,
}

/// Why a tool call cannot be judged: the sidecar refuses it (fail closed).
#[derive(Debug, Clone)]
pub struct NoPolicies {
    pub reason: String,
}

impl Policies {
    pub fn new(dir: PathBuf, metrics: Arc<Metrics>) -> Policies {
        Policies {
            dir,
            current: ArcSwapOption::empty(),
            status: Mutex::new(Status::default()),
            metrics,
            reload_lock: tokio::sync::Mutex::new(()),
            bundle: Mutex::new(None),
        }
    }

    /// The revision of the last good bundle, if any.
    pub fn bundle_revision(&self) -> Option<String> {
        self.lock_bundle().as_ref().map(|b| b.revision.clone())
    }

    /// Makes `bundle` the control plane's part of the set and reloads. Returns whether a new set
    /// was swapped in (not when, say, a policy file and the bundle define the same name: the
    /// last good set stays, and `/policies` says why).
    pub async fn set_bundle(&self, bundle: Bundle) -> bool {
        *self.lock_bundle() = Some(Arc::new(bundle));
        self.bundle_accepted();
        self.refresh().await
    }

    /// Records that the newest bundle was refused; the last good one stays in force.
    pub fn bundle_refused(&self, error: String) {
        let mut status = self.lock_status();
        status.bundle_error = Some(error);
        self.metrics.reloads.with_label_values(&["failure"]).inc();
        self.metrics.synchronized.set(0);
    }

    fn bundle_accepted(&self) {
        let mut status = self.lock_status();
        if status.bundle_error.take().is_some() && status.error.is_none() {
            self.metrics.synchronized.set(1);
        }
    }

    fn lock_bundle(&self) -> std::sync::MutexGuard<'_, Option<Arc<Bundle>>> {
        self.bundle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set in force, or why there is none.
    pub fn current(&self) -> Result<Arc<Active>, NoPolicies> {
        match self.current.load_full() {
            Some(active) if !active.set.is_empty() => Ok(active),
            Some(_) => Err(NoPolicies {
                reason: format!(
                    "no policies are loaded (the policy directory {} has no policy files); tool calls are refused",
                    self.dir.display()
                ),
            }),
            None => Err(NoPolicies {
                reason: format!(
                    "no valid policy set is loaded from {}; tool calls are refused until the policy files are fixed",
                    self.dir.display()
                ),
            }),
        }
    }

    pub fn ready(&self) -> bool {
        self.current().is_ok()
    }

    /// Loads the directory if its files changed since the last attempt. Returns whether a new
    /// set was swapped in.
    pub async fn refresh(&self) -> bool {
        let _serial = self.reload_lock.lock().await;
        let dir = self.dir.clone();
        let bundle = self.lock_bundle().clone();
        let revision = bundle.as_ref().map(|b| b.revision.clone());
        let fingerprint =
            tokio::task::spawn_blocking(move || fingerprint(&dir, revision.as_deref()))
                .await
                .unwrap_or(0);
        if self.lock_status().fingerprint == Some(fingerprint) {
            return false;
        }
        let dir = self.dir.clone();
        let with = bundle.clone();
        let result = tokio::task::spawn_blocking(move || load(&dir, with.as_deref())).await;
        let now = SystemTime::now();
        let mut status = self.lock_status();
        status.fingerprint = Some(fingerprint);
        status.attempted_at = Some(now);
        match result {
            Ok(Ok(loaded)) => {
                let names: Vec<&str> = loaded
                    .set
                    .policies()
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                tracing::info!(
                    dir = %self.dir.display(),
                    bundle = bundle.as_ref().map(|b| b.revision.as_str()),
                    policies = ?names,
                    "policy set loaded"
                );
                self.current.store(Some(Arc::new(Active {
                    set: loaded.set,
                    files: loaded.files,
                    bundle,
                    loaded_at: now,
                })));
                status.error = None;
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.metrics
                    .synchronized
                    .set(i64::from(status.bundle_error.is_none()));
                true
            }
            Ok(Err(diagnostics)) => {
                let error = diagnostics.to_string();
                tracing::error!(
                    dir = %self.dir.display(),
                    error = %error,
                    "policy files could not be loaded; keeping the last good set"
                );
                status.error = Some(error);
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                self.metrics.synchronized.set(0);
                false
            }
            Err(join) => {
                let error = format!("policy loading failed: {join}");
                tracing::error!(error = %error, "keeping the last good set");
                status.error = Some(error);
                // Try again next time rather than trusting this fingerprint.
                status.fingerprint = None;
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                self.metrics.synchronized.set(0);
                false
            }
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A panic while holding the lock cannot leave Status inconsistent: take it anyway.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `/policies` shows.
    pub fn report(&self) -> Report {
        let status = self.lock_status();
        let active = self.current.load_full();
        Report {
            policy_dir: self.dir.display().to_string(),
            ready: self.ready(),
            synchronized: status.error.is_none()
                && status.bundle_error.is_none()
                && status.attempted_at.is_some(),
            loaded_at: active.as_ref().map(|a| rfc3339(a.loaded_at)),
            last_attempt_at: status.attempted_at.map(rfc3339),
            error: status.error.clone(),
            bundle_revision: active
                .as_ref()
                .and_then(|a| a.bundle.as_ref())
                .map(|b| b.revision.clone()),
            bundle_error: status.bundle_error.clone(),
            policies: active
                .as_ref()
                .map(|a| {
                    a.set
                        .policies()
                        .iter()
                        .map(|p| {
                            let file = a.files.iter().find(|f| f.policy == p.name);
                            let bundled = a
                                .bundle
                                .as_ref()
                                .and_then(|b| b.policies.iter().find(|b| b.policy.name == p.name));
                            PolicyReport {
                                name: p.name.clone(),
                                enforcement: p.enforcement.as_str().to_owned(),
                                rules: p.rules,
                                file: file.map(|f| f.path.display().to_string()),
                                hash: file.map(|f| f.hash.clone()),
                                policy_id: bundled.map(|b| b.policy_id.clone()),
                                version: bundled.map(|b| b.version),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
            limits: active
                .as_ref()
                .and_then(|a| serde_json::to_value(a.set.limits()).ok()),
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub policy_dir: String,
    pub ready: bool,
    pub synchronized: bool,
    pub loaded_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub error: Option<String>,
    /// The control plane's bundle compiled into the set in force.
    pub bundle_revision: Option<String>,
    /// Why the newest bundle was not applied.
    pub bundle_error: Option<String>,
    pub policies: Vec<PolicyReport>,
    pub limits: Option<serde_json::Value>,
}

#[derive(Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub enforcement: String,
    pub rules: usize,
    pub file: Option<String>,
    pub hash: Option<String>,
    /// For a policy from the control plane's bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// The files' policies and the bundle's, compiled into one set.
fn load(dir: &Path, bundle: Option<&Bundle>) -> Result<policy_files::Loaded, Diagnostics> {
    let (mut policies, files): (Vec<Policy>, Vec<LoadedFile>) =
        policy_files::read_policies(&[dir.to_owned()])?
            .into_iter()
            .unzip();
    if let Some(bundle) = bundle {
        policies.extend(bundle.policies.iter().map(|b| b.policy.clone()));
    }
    let set = PolicySet::compile(policies)?;
    Ok(policy_files::Loaded { set, files })
}

/// A hash of the policy files' names and bytes, and of the bundle's revision. Reading a handful
/// of small files is far cheaper than compiling them, and unlike modification times it sees a
/// ConfigMap's symlink swap.
fn fingerprint(dir: &Path, bundle: Option<&str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    match policy_files::policy_files(&[dir.to_owned()]) {
        Ok(files) => {
            for f in files {
                eat(f.as_os_str().as_encoded_bytes());
                eat(&[0]);
                match std::fs::read(&f) {
                    Ok(bytes) => eat(&bytes),
                    Err(e) => eat(e.to_string().as_bytes()),
                }
                eat(&[0xff]);
            }
        }
        Err(e) => eat(e.to_string().as_bytes()),
    }
    if let Some(revision) = bundle {
        eat(b"\0bundle\0");
        eat(revision.as_bytes());
    }
    h
}

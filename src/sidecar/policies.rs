//! The loaded policy set, swapped whole on reload, and its load status.
//!
//! Compilation happens off the request path (on a blocking thread); requests take an `Arc` of
//! whatever set is current, so a reload never fails or stalls a request in flight. A bad file
//! keeps the last good set. With no valid, non-empty set the sidecar fails closed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use perfecx_policy::PolicySet;
use serde::Serialize;

use super::metrics::Metrics;
use super::time::rfc3339;
use crate::policy_files::{self, LoadedFile};

/// A compiled set in force, and where it came from.
pub struct Active {
    pub set: PolicySet,
    pub files: Vec<LoadedFile>,
    pub loaded_at: SystemTime,
}

#[derive(Default)]
struct Status {
    /// Fingerprint of the files last tried, loaded or not: unchanged files are not recompiled.
    fingerprint: Option<u64>,
    error: Option<String>,
    attempted_at: Option<SystemTime>,
}

pub struct Policies {
    dir: PathBuf,
    current: ArcSwapOption<Active>,
    status: Mutex<Status>,
    metrics: Arc<Metrics>,
    /// Serialises reloads (watcher and poller may race).
    reload_lock: tokio::sync::Mutex<()>,
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
        }
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
        let fingerprint = tokio::task::spawn_blocking(move || fingerprint(&dir))
            .await
            .unwrap_or(0);
        if self.lock_status().fingerprint == Some(fingerprint) {
            return false;
        }
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || policy_files::load(&[dir])).await;
        let now = SystemTime::now();
        let mut status = self.lock_status();
        status.fingerprint = Some(fingerprint);
        status.attempted_at = Some(now);
        match result {
            Ok(Ok(loaded)) => {
                let names: Vec<&str> = loaded.files.iter().map(|f| f.policy.as_str()).collect();
                tracing::info!(dir = %self.dir.display(), policies = ?names, "policy set loaded");
                self.current.store(Some(Arc::new(Active {
                    set: loaded.set,
                    files: loaded.files,
                    loaded_at: now,
                })));
                status.error = None;
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.metrics.synchronized.set(1);
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
            synchronized: status.error.is_none() && status.attempted_at.is_some(),
            loaded_at: active.as_ref().map(|a| rfc3339(a.loaded_at)),
            last_attempt_at: status.attempted_at.map(rfc3339),
            error: status.error.clone(),
            policies: active
                .as_ref()
                .map(|a| {
                    a.set
                        .policies()
                        .iter()
                        .map(|p| {
                            let file = a.files.iter().find(|f| f.policy == p.name);
                            PolicyReport {
                                name: p.name.clone(),
                                enforcement: p.enforcement.as_str().to_owned(),
                                rules: p.rules,
                                file: file.map(|f| f.path.display().to_string()),
                                hash: file.map(|f| f.hash.clone()),
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
}

/// A hash of the policy files' names and bytes. Reading a handful of small files is far cheaper
/// than compiling them, and unlike modification times it sees a ConfigMap's symlink swap.
fn fingerprint(dir: &Path) -> u64 {
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
    h
}

//! Reporting to the control plane, off the request path.
//!
//! Request handlers hand [`Record`]s to a [`Reporter`], which puts them in a bounded queue
//! without ever waiting. One task ([`Delivery`]) turns them into events, batches them (up to
//! [`BATCH_EVENTS`], or every `flush_interval_ms`) and sends the batches to
//! `POST {url}/v1/agents/{agent_id}/events` with the agent's token, one request at a time,
//! taking new events from the queue while a request is out.
//!
//! - A batch that cannot be delivered (no connection, no answer, 408, 429, 5xx) goes to the
//!   [`Spool`]. Sending resumes after a backoff (exponential with jitter, or the server's
//!   `Retry-After` if longer), oldest spooled batch first, with the events' original ids: the
//!   control plane stores an id once, so a batch that arrives twice is stored once.
//! - While the spool holds anything, new batches join it, so that events go out in order.
//! - More than [`MAX_WAITING`] events waiting in memory (the control plane is slow) are spooled.
//! - A batch refused for good (any other 4xx) is logged and counted as dropped, not retried.
//! - On shutdown the queue is flushed: sent while the control plane answers, within
//!   [`SHUTDOWN_FLUSH`]; spooled otherwise. Spooled events wait for the next start.
//!
//! Events are lost only when the queue is full (the task cannot keep up), the spool is full
//! or cannot be written, the control plane refuses them, or a spooled record is damaged; each
//! is counted in `perfecx_events_dropped_total{reason}` and logged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use perfecx_api::{ErrorBody, EventBatch, NewEvent};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::ControlPlane;
use super::events::Record;
use super::metrics::Metrics;
use super::spool::{Spool, SpoolError};
use super::upstream::{HttpClient, describe_client_error, http_client};

/// Events in one request (the control plane takes up to 1,000), and in one spool segment.
pub const BATCH_EVENTS: usize = 500;
/// Records the queue holds before the request path starts dropping them.
pub const QUEUE_CAPACITY: usize = 4096;
/// Events kept in memory waiting for the control plane before they are spooled.
pub const MAX_WAITING: usize = 4 * BATCH_EVENTS;
/// How long shutdown may spend sending what is left before spooling it.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is not waited for in full.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// The request path's end of the queue. Cloning is cheap.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Record>,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last "queue full" warning, so that a flood logs one line, not one per
    /// event.
    last_warning: Arc<AtomicU64>,
}

impl Reporter {
    /// Queues `record`; never waits. A full queue drops it, counted and logged.
    pub fn record(&self, record: Record) {
        let reason = match self.tx.try_send(record) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "queue_full",
            Err(TrySendError::Closed(_)) => "spool_failed",
        };
        self.metrics.events_dropped(reason, 1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                capacity = QUEUE_CAPACITY,
                "the event queue is full: events are dropped (perfecx_events_dropped_total{{reason=\"queue_full\"}})"
            );
        }
    }
}

/// The running reporter: stop it with [`Reporting::shutdown`] once no request can record more.
pub struct Reporting {
    pub reporter: Reporter,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Reporting {
    /// Flushes the queue (sending, or spooling what the control plane does not take in time)
    /// and stops.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts reporting for `agent_id` as `settings` say: opens the spool (an error if it cannot
/// be used) and spawns the delivery task.
pub async fn start(
    settings: &ControlPlane,
    agent_id: &str,
    metrics: Arc<Metrics>,
) -> Result<Reporting, String> {
    let base = settings.base_uri()?;
    let endpoint = events_uri(&base, agent_id)?;
    let token = settings.token()?;
    let authorization = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        "the registration token holds characters not allowed in a header".to_owned()
    })?;
    let dir = settings.spool_dir();
    let max_bytes = settings.spool_max_bytes();
    let opened = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || Spool::open(&dir, max_bytes, BATCH_EVENTS)
    })
    .await
    .map_err(|e| e.to_string())?;
    let spool = opened.map_err(|e| {
        format!(
            "cannot use the spool directory {} (control_plane.spool_dir): {e}",
            dir.display()
        )
    })?;
    metrics.event_spool_bytes.set(gauge(spool.total_bytes()));
    if !spool.is_empty() {
        tracing::info!(
            spool = %dir.display(),
            bytes = spool.total_bytes(),
            "events spooled by an earlier run are sent first"
        );
    }
    tracing::info!(endpoint = %endpoint, spool = %dir.display(), "reporting events to the control plane");

    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let stop = CancellationToken::new();
    let delivery = Delivery {
        endpoint,
        authorization,
        client: http_client(),
        metrics: metrics.clone(),
        spooled: !spool.is_empty(),
        spool: Arc::new(Mutex::new(spool)),
        flush_interval: settings.flush_interval(),
        batch: Vec::new(),
        batch_since: None,
        waiting: VecDeque::new(),
        waiting_events: 0,
        failures: 0,
        retry_at: None,
        spool_full_logged: false,
        stopping: false,
    };
    let task = tokio::spawn(delivery.run(rx, stop.clone()));
    Ok(Reporting {
        reporter: Reporter {
            tx,
            metrics,
            last_warning: Arc::new(AtomicU64::new(0)),
        },
        stop,
        task,
    })
}

fn events_uri(base: &Uri, agent_id: &str) -> Result<Uri, String> {
    let url = format!(
        "{}/v1/agents/{agent_id}/events",
        base.to_string().trim_end_matches('/')
    );
    url.parse()
        .map_err(|e| format!("cannot make the events URL `{url}`: {e}"))
}

fn gauge(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Where a batch in flight came from, so that its outcome is applied there.
enum Origin {
    Memory,
    Segment(u64),
}

struct Inflight {
    origin: Origin,
    events: Vec<NewEvent>,
    handle: JoinHandle<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Accepted,
    /// Worth sending again later; `after` is the server's `Retry-After`.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Refused for good.
    Rejected {
        status: StatusCode,
        message: String,
    },
}

struct Delivery {
    endpoint: Uri,
    authorization: HeaderValue,
    client: HttpClient,
    metrics: Arc<Metrics>,
    /// Only this task uses it; the mutex lets blocking threads borrow it.
    spool: Arc<Mutex<Spool>>,
    /// The spool holds segments to send.
    spooled: bool,
    flush_interval: Duration,
    /// The batch being filled, and when its first event came.
    batch: Vec<NewEvent>,
    batch_since: Option<Instant>,
    /// Full batches waiting in memory; used only while the spool is empty.
    waiting: VecDeque<Vec<NewEvent>>,
    waiting_events: usize,
    /// Failed attempts in a row, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
    spool_full_logged: bool,
    stopping: bool,
}

impl Delivery {
    async fn run(mut self, mut rx: mpsc::Receiver<Record>, stop: CancellationToken) {
        let mut inflight: Option<Inflight> = None;
        loop {
            if inflight.is_none() && self.may_send() {
                inflight = self.next_send().await;
            }
            self.set_depth(rx.len(), inflight.as_ref());
            let flush_at = self.batch_since.map(|t| t + self.flush_interval);
            let retry_at = self
                .retry_at
                .filter(|t| inflight.is_none() && self.has_backlog() && *t > Instant::now());
            tokio::select! {
                _ = stop.cancelled() => break,
                record = rx.recv() => match record {
                    Some(record) => self.push(record).await,
                    None => break,
                },
                outcome = wait(&mut inflight) => {
                    if let Some(job) = inflight.take() {
                        self.finish(job, outcome).await;
                    }
                }
                _ = sleep_until(flush_at), if flush_at.is_some() => self.flush().await,
                _ = sleep_until(retry_at), if retry_at.is_some() => {}
            }
        }
        self.shutdown(rx, inflight).await;
    }

    async fn shutdown(mut self, mut rx: mpsc::Receiver<Record>, inflight: Option<Inflight>) {
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        self.stopping = true;
        rx.close();
        while let Some(record) = rx.recv().await {
            self.push(record).await;
        }
        self.flush().await;
        if let Some(job) = inflight {
            self.finish_by(job, deadline).await;
        }
        while let Some(events) = self.waiting.pop_front() {
            self.waiting_events -= events.len();
            if self.failures > 0 || Instant::now() >= deadline {
                self.spool_events(events).await;
                continue;
            }
            let job = self.send(Origin::Memory, events);
            self.finish_by(job, deadline).await;
        }
        self.set_depth(0, None);
        let spool = self.spool.lock().map(|s| s.total_bytes()).unwrap_or(0);
        if spool > 0 {
            tracing::info!(
                bytes = spool,
                "events left in the spool are sent at the next start"
            );
        }
    }

    /// Waits for `job` until `deadline`; a job still out then is abandoned and its events
    /// spooled (if they arrived after all, the control plane recognises them when resent).
    async fn finish_by(&mut self, mut job: Inflight, deadline: Instant) {
        match tokio::time::timeout_at(deadline, &mut job.handle).await {
            Ok(outcome) => {
                let outcome = outcome.unwrap_or_else(|e| Outcome::Retry {
                    reason: format!("the sending task failed: {e}"),
                    after: None,
                });
                self.finish(job, outcome).await;
            }
            Err(_) => {
                job.handle.abort();
                let outcome = Outcome::Retry {
                    reason: "no answer before the sidecar stopped".into(),
                    after: None,
                };
                self.finish(job, outcome).await;
            }
        }
    }

    fn has_backlog(&self) -> bool {
        self.spooled || !self.waiting.is_empty()
    }

    fn may_send(&self) -> bool {
        self.has_backlog() && self.retry_at.is_none_or(|t| t <= Instant::now())
    }

    fn set_depth(&self, queued: usize, inflight: Option<&Inflight>) {
        let out = inflight
            .filter(|j| matches!(j.origin, Origin::Memory))
            .map_or(0, |j| j.events.len());
        let depth = queued + self.batch.len() + self.waiting_events + out;
        self.metrics.event_queue_depth.set(gauge(depth));
    }

    async fn push(&mut self, record: Record) {
        self.batch.push(record.into_event());
        if self.batch_since.is_none() {
            self.batch_since = Some(Instant::now());
        }
        if self.batch.len() >= BATCH_EVENTS {
            self.flush().await;
        }
    }

    /// Moves the batch being filled to the queue of batches to send (or to the spool, behind
    /// what is there already).
    async fn flush(&mut self) {
        self.batch_since = None;
        let events = std::mem::take(&mut self.batch);
        if events.is_empty() {
            return;
        }
        if self.spooled || self.failures > 0 {
            self.spool_events(events).await;
            return;
        }
        self.waiting_events += events.len();
        self.waiting.push_back(events);
        if self.waiting_events > MAX_WAITING {
            tracing::info!(
                events = self.waiting_events,
                "the control plane is behind: events waiting in memory are spooled"
            );
            while let Some(events) = self.waiting.pop_front() {
                self.waiting_events -= events.len();
                self.spool_events(events).await;
            }
        }
    }

    /// The next batch to send, oldest first: spooled segments, then memory.
    async fn next_send(&mut self) -> Option<Inflight> {
        if self.spooled {
            let spool = self.spool.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut spool = spool.lock().map_err(|_| "the spool lock is poisoned")?;
                let mut skipped = 0;
                loop {
                    match spool.oldest() {
                        Ok(Some(s)) if s.events.is_empty() => {
                            skipped += s.skipped;
                            spool.remove(s.seq).map_err(|e| e.to_string())?;
                        }
                        Ok(Some(s)) => return Ok((Some((s.seq, s.events)), skipped + s.skipped)),
                        Ok(None) => return Ok((None, skipped)),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            self.update_spool_gauge();
            match read {
                Ok((segment, skipped)) => {
                    if skipped > 0 {
                        self.metrics.events_dropped("unreadable", skipped);
                    }
                    match segment {
                        Some((seq, events)) => {
                            return Some(self.send(Origin::Segment(seq), events));
                        }
                        None => self.spooled = false,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool; trying again later");
                    self.back_off(None);
                    return None;
                }
            }
        }
        let events = self.waiting.pop_front()?;
        self.waiting_events -= events.len();
        Some(self.send(Origin::Memory, events))
    }

    fn send(&self, origin: Origin, events: Vec<NewEvent>) -> Inflight {
        let body = serde_json::to_vec(&EventBatch {
            events: events.clone(),
        });
        let handle = match body {
            Ok(body) => tokio::spawn(post(
                self.client.clone(),
                self.endpoint.clone(),
                self.authorization.clone(),
                Bytes::from(body),
            )),
            Err(e) => {
                let message = format!("cannot encode the batch: {e}");
                tokio::spawn(async move {
                    Outcome::Rejected {
                        status: StatusCode::BAD_REQUEST,
                        message,
                    }
                })
            }
        };
        Inflight {
            origin,
            events,
            handle,
        }
    }

    async fn finish(&mut self, job: Inflight, outcome: Outcome) {
        let count = job.events.len();
        match outcome {
            Outcome::Accepted => {
                self.metrics.events_sent.inc_by(count as u64);
                if self.failures > 0 {
                    tracing::info!("the control plane takes events again");
                }
                self.failures = 0;
                self.retry_at = None;
                if let Origin::Segment(seq) = job.origin {
                    self.remove_segment(seq).await;
                }
            }
            Outcome::Rejected { status, message } => {
                tracing::error!(
                    status = status.as_u16(),
                    events = count,
                    message = %message,
                    "the control plane refused a batch of events; they are dropped, not retried (perfecx_events_dropped_total{{reason=\"rejected\"}})"
                );
                self.metrics.events_dropped("rejected", count);
                // It answered: no reason to wait before the next batch.
                self.failures = 0;
                self.retry_at = None;
                if let Origin::Segment(seq) = job.origin {
                    self.remove_segment(seq).await;
                }
            }
            Outcome::Retry { reason, after } => {
                let delay = self.back_off(after);
                if self.failures == 1 || self.failures % 10 == 0 {
                    tracing::warn!(
                        reason = %reason,
                        attempts = self.failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot deliver events to the control plane; they are spooled and sent again"
                    );
                }
                if let Origin::Memory = job.origin {
                    self.spool_events(job.events).await;
                }
            }
        }
    }

    /// Counts a failed attempt and sets when the next may start.
    fn back_off(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = BACKOFF_BASE.saturating_mul(1 << (self.failures - 1).min(16));
        let capped = exp.min(BACKOFF_MAX);
        // Full jitter over the upper half: sidecars that lost the control plane together do not
        // all come back in the same instant.
        let delay = capped.mul_f64(rand::random_range(0.5..=1.0));
        let delay = match retry_after {
            Some(after) => delay.max(after.min(RETRY_AFTER_MAX)),
            None => delay,
        };
        self.retry_at = Some(Instant::now() + delay);
        delay
    }

    /// Writes `events` to the spool; if that fails, they wait in memory while there is room
    /// (and the sidecar is not stopping), and are dropped otherwise.
    async fn spool_events(&mut self, events: Vec<NewEvent>) {
        let count = events.len();
        let spool = self.spool.clone();
        let (events, written) = tokio::task::spawn_blocking(move || {
            let written = match spool.lock() {
                Ok(mut spool) => spool.append(&events),
                Err(_) => Err(SpoolError::Io(std::io::Error::other(
                    "the spool lock is poisoned",
                ))),
            };
            (events, written)
        })
        .await
        .unwrap_or_else(|e| {
            (
                Vec::new(),
                Err(SpoolError::Io(std::io::Error::other(e.to_string()))),
            )
        });
        self.update_spool_gauge();
        match written {
            Ok(()) => {
                self.metrics.events_spooled.inc_by(count as u64);
                self.spooled = true;
                if self.spool_full_logged {
                    tracing::info!("the spool has room again");
                    self.spool_full_logged = false;
                }
            }
            Err(SpoolError::Full { limit }) => {
                self.metrics.events_dropped("spool_full", count);
                if !self.spool_full_logged {
                    self.spool_full_logged = true;
                    tracing::error!(
                        limit_bytes = limit,
                        "the event spool is full (control_plane.spool_max_bytes): new events are dropped until the control plane takes the backlog (perfecx_events_dropped_total{{reason=\"spool_full\"}})"
                    );
                }
            }
            Err(SpoolError::Io(e)) => {
                let room = self.waiting_events + count <= MAX_WAITING;
                if !self.stopping && room && !events.is_empty() {
                    tracing::error!(error = %e, "cannot write to the event spool; the events wait in memory");
                    self.waiting_events += count;
                    self.waiting.push_back(events);
                } else {
                    tracing::error!(
                        error = %e,
                        events = count,
                        "cannot write to the event spool; events are dropped (perfecx_events_dropped_total{{reason=\"spool_failed\"}})"
                    );
                    self.metrics.events_dropped("spool_failed", count);
                }
            }
        }
    }

    async fn remove_segment(&mut self, seq: u64) {
        let spool = self.spool.clone();
        let removed = tokio::task::spawn_blocking(move || match spool.lock() {
            Ok(mut spool) => spool.remove(seq).map_err(|e| e.to_string()),
            Err(_) => Err("the spool lock is poisoned".to_owned()),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = removed {
            // Sent again later, and recognised by the control plane as a resend.
            tracing::error!(error = %e, "cannot delete a delivered spool segment");
        }
        self.update_spool_gauge();
    }

    fn update_spool_gauge(&self) {
        if let Ok(spool) = self.spool.lock() {
            self.metrics
                .event_spool_bytes
                .set(gauge(spool.total_bytes()));
        }
    }
}

/// The outcome of the batch in flight; pending for ever when there is none.
async fn wait(inflight: &mut Option<Inflight>) -> Outcome {
    match inflight {
        Some(job) => (&mut job.handle).await.unwrap_or_else(|e| Outcome::Retry {
            reason: format!("the sending task failed: {e}"),
            after: None,
        }),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends one batch and classifies the answer.
async fn post(client: HttpClient, uri: Uri, authorization: HeaderValue, body: Bytes) -> Outcome {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::AUTHORIZATION, authorization);
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("perfecx-sidecar/", env!("CARGO_PKG_VERSION"))),
    );
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let res = client
            .request(req)
            .await
            .map_err(|e| describe_client_error(&e))?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(res.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((status, retry_after, body))
    })
    .await;
    let (status, retry_after, body) = match answer {
        Err(_) => {
            return Outcome::Retry {
                reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                after: None,
            };
        }
        Ok(Err(reason)) => {
            return Outcome::Retry {
                reason,
                after: None,
            };
        }
        Ok(Ok(answer)) => answer,
    };
    if status.is_success() {
        return Outcome::Accepted;
    }
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| super::events::cut(&String::from_utf8_lossy(&body), 512));
    let transient = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if transient {
        Outcome::Retry {
            reason: format!("it answered {status}: {message}"),
            after: retry_after,
        }
    } else {
        Outcome::Rejected { status, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_url_keeps_a_base_path() {
        let base: Uri = "http://cp.internal:8080/perfecx/".parse().unwrap();
        assert_eq!(
            events_uri(&base, "a-1").unwrap().to_string(),
            "http://cp.internal:8080/perfecx/v1/agents/a-1/events"
        );
        let base: Uri = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            events_uri(&base, "a").unwrap().to_string(),
            "http://127.0.0.1:8080/v1/agents/a/events"
        );
    }
}

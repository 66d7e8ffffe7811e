//! MCP servers over stdio that the sidecar runs (`mcp_command`), served to the agent over
//! Streamable HTTP like any other upstream.
//!
//! The process runs in its own process group, under an address-space limit taken from
//! `max_memory_mb`, and is killed with the sidecar. If it dies, the calls in flight get an
//! error and it is started again with backoff; the agent's `initialize` is replayed so that the
//! session carries on. Request ids are renumbered so that several agent connections can share
//! the one process, and so are progress tokens: a request's progress notifications go to the
//! agent that sent it, on the event stream that answers its POST.
//!
//! The process's requests (`roots/list`, elicitation, sampling) and log messages carry nothing
//! that says which request of which agent they belong to. While exactly one POST waits for
//! answers, they go on its answer, as an MCP server over HTTP sends them; otherwise, and for
//! its other notifications (a tool list that changed, ...), to every GET stream. A POST is
//! answered with plain JSON unless such a message, or progress, comes with its answers.
//!
//! Each request of the process's is kept until an agent answers it, and only the first answer
//! reaches the process. One that reaches no agent (none waits, none has a GET stream open, as
//! when a server asks for the roots as soon as it is initialized) waits for the next GET stream,
//! and after [`UNHEARD_TIMEOUT`] the process is answered with an error rather than left waiting.
//! GET-stream events are numbered: a stream that resumes (`Last-Event-ID`) gets again the
//! requests sent since that no agent has answered. One whose POST hung up unanswered is
//! answered with an error. The process's cancellation of one of its requests goes where the
//! request went.
//!
//! `initialize` gets an `Mcp-Session-Id`, without which some clients (the Python SDK's) open no
//! GET stream. The process is shared, so a session holds no state of its own; its id only tells
//! apart two agents' requests that have the same id, when one of them is cancelled.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use perfecx_policy::Enforcement;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use super::denial::UpstreamFailed;
use super::jsonrpc;
use super::policies::Policies;
use super::rescue;
use super::sse;

const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A process that ran this long before dying starts again without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How long a request waits for a (re)starting process.
const WAIT_FOR_PROCESS: Duration = Duration::from_secs(10);

type PendingMap = Mutex<HashMap<u64, oneshot::Sender<Map<String, Value>>>>;
/// The requests that asked for progress, by the token the process sees (the request's internal
/// id): the agent's own token, and where its notifications go.
type ProgressMap = Mutex<HashMap<u64, (Value, mpsc::Sender<String>)>>;

const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// How long a request of the process's that no agent could hear waits for a GET stream.
const UNHEARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Such requests kept at most; the process is answered at once beyond that.
const MAX_UNHEARD: usize = 64;

/// The process's requests kept until answered, at most; beyond that, the oldest is answered
/// with an error.
const MAX_ASKED: usize = 64;

/// Messages for one POST (progress, the process's own) that may wait to be sent; beyond that,
/// progress is dropped and the process's own messages go to the GET streams.
const PROGRESS_BUFFER: usize = 64;

/// One running process.
struct Conn {
    stdin: mpsc::Sender<String>,
    pending: PendingMap,
    progress: ProgressMap,
    /// The session and the agent's id of each request in flight, by its internal id, for
    /// cancellations.
    agent_ids: Mutex<HashMap<u64, (Option<String>, Value)>>,
    /// Every POST waiting for answers, and where its messages go if its agent takes an event
    /// stream: the process's own messages go there while exactly one POST waits.
    waiting: Mutex<HashMap<u64, Option<mpsc::Sender<String>>>>,
    /// The key of the next entry in `waiting`.
    next_waiting: AtomicU64,
    /// The process's requests that no agent could hear yet.
    unheard: Mutex<Unheard>,
    /// The process's requests that no agent has answered yet, oldest first.
    asked: Mutex<VecDeque<Asked>>,
    /// Whether agents may use the process: it is started, and the agent's `initialize` was
    /// replayed if it had to be. GET streams use it before, as the replay can make it ask.
    ready: AtomicBool,
    /// Whether the process has ended: no request is registered any more.
    closed: AtomicBool,
    /// Whether the process was sent `notifications/initialized`: once, by the first agent (or
    /// the replay after a restart); the agents after it share the initialized process.
    initialized: AtomicBool,
    /// The `initialize` requests in flight, by internal id, with their params and the turn
    /// they hold: the first answer is cached (in `init`) as the process gives it, whether or
    /// not its agent is still there, and only then may the next agent initialize.
    initializing: Mutex<HashMap<u64, (Value, Option<InitTurn>)>>,
    init: Arc<Mutex<Option<InitCache>>>,
}

/// Requests of the process's that no agent could hear yet, oldest first.
#[derive(Default)]
struct Unheard {
    requests: VecDeque<Queued>,
}

struct Queued {
    /// Its event id on the GET streams, which also tells it apart from a later request with
    /// the same id (the process may use one again once it is answered).
    event: u64,
    /// The request's id, as JSON text.
    id: String,
    line: String,
}

type InitTurn = tokio::sync::OwnedMutexGuard<()>;

/// A request of the process's that no agent has answered yet.
struct Asked {
    /// Its id, as JSON text.
    id: String,
    /// The request as the process wrote it, to ask it again.
    line: String,
    to: To,
}

/// Where a request of the process's went.
#[derive(Clone, Copy, PartialEq)]
enum To {
    /// On the answer to the POST with this key in [`Conn::waiting`].
    Post(u64),
    /// To the GET streams, as the event with this id (or into the queue for the next stream).
    Streams(u64),
}

/// The agents' GET streams of one server's messages; they outlive its processes.
struct Streams {
    /// Each message with its event id.
    events: broadcast::Sender<(u64, String)>,
    /// The last event id given. Ids begin at the time the sidecar started, in microseconds, so
    /// that an agent resuming with an id from an earlier run misses nothing of this one.
    last_event: AtomicU64,
}

impl Streams {
    fn new() -> Streams {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let start = now.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Streams {
            events: broadcast::channel(256).0,
            last_event: AtomicU64::new(start),
        }
    }

    /// The id of a new event.
    fn next_event(&self) -> u64 {
        self.last_event.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends a message to every GET stream as the event `event`; says whether any stream was
    /// open to get it. Only the process's reader task sends, so events go out in order.
    fn send(&self, event: u64, line: String) -> bool {
        self.events.send((event, line)).is_ok()
    }

    /// Sends a notification to every GET stream, if any is open.
    fn notify(&self, line: String) {
        self.send(self.next_event(), line);
    }
}

impl Conn {
    fn new(stdin: mpsc::Sender<String>, init: Arc<Mutex<Option<InitCache>>>) -> Conn {
        Conn {
            stdin,
            pending: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            agent_ids: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            next_waiting: AtomicU64::new(0),
            unheard: Mutex::default(),
            asked: Mutex::default(),
            ready: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            initialized: AtomicBool::new(false),
            initializing: Mutex::new(HashMap::new()),
            init,
        }
    }

    /// Writes a message to the process without waiting: from a place that cannot wait, or
    /// must not wait on a process that is slow to read.
    fn tell(&self, line: String) {
        // Otherwise sent, or the process is gone and its requests with it.
        if let Err(mpsc::error::TrySendError::Full(line)) = self.stdin.try_send(line)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let stdin = self.stdin.clone();
            rt.spawn(async move { stdin.send(line).await });
        }
    }
}

struct InitCache {
    params: Value,
    result: Value,
}

pub struct StdioServer {
    name: Arc<str>,
    conn: watch::Sender<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    init: Arc<Mutex<Option<InitCache>>>,
    /// Held by an uncached `initialize` until it is answered: an agent that initializes at the
    /// same moment then gets the cached answer instead of initializing the process again.
    init_turn: Arc<tokio::sync::Mutex<()>>,
    /// Where the messages the server sends on its own (requests, notifications) go.
    streams: Arc<Streams>,
}

impl StdioServer {
    /// Starts the process and its supervisor, which stops (killing the process group) when
    /// `shutdown` is cancelled.
    pub fn start(
        name: Arc<str>,
        command: Vec<String>,
        policies: Arc<Policies>,
        max_line: usize,
        shutdown: CancellationToken,
    ) -> (Arc<StdioServer>, tokio::task::JoinHandle<()>) {
        let server = Arc::new(StdioServer::new(name));
        let task = tokio::spawn(supervise(
            server.clone(),
            command,
            policies,
            max_line,
            shutdown,
        ));
        (server, task)
    }

    fn new(name: Arc<str>) -> StdioServer {
        StdioServer {
            name,
            conn: watch::Sender::new(None),
            next_id: AtomicU64::new(1),
            init: Arc::new(Mutex::new(None)),
            init_turn: Arc::default(),
            streams: Arc::new(Streams::new()),
        }
    }

    fn failed(&self, reason: impl Into<String>) -> UpstreamFailed {
        UpstreamFailed {
            upstream: self.name.to_string(),
            reason: reason.into(),
        }
    }

    /// Serves one Streamable HTTP request.
    pub async fn send(
        &self,
        method: Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, UpstreamFailed> {
        match method {
            Method::POST => self.post(headers, body).await,
            Method::GET => Ok(self.event_stream(headers)),
            // Also DELETE: a session holds nothing to end, the process is shared (405 is how
            // the transport says so).
            _ => {
                let mut res = Response::new(Body::empty());
                *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                res.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, GET"));
                Ok(res)
            }
        }
    }

    async fn post(
        &self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, UpstreamFailed> {
        let parsed = jsonrpc::parse_body(&body).map_err(|m| self.failed(m.0))?;
        let conn = self.connection().await?;
        let session = headers
            .get(MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut waits = Vec::new();
        let mut answers: Vec<String> = Vec::new();
        let messages: Vec<Option<Map<String, Value>>> = parsed
            .messages
            .iter()
            .map(|raw| serde_json::from_str(raw.get()).ok())
            .collect();
        let mut guard = PendingGuard {
            conn: conn.clone(),
            ids: Vec::new(),
            waiting: None,
            answered: false,
            unwritten: None,
        };
        // Progress and the process's own messages can only reach an agent that accepts an
        // event stream as the answer.
        let (stream_tx, stream_rx) = mpsc::channel(PROGRESS_BUFFER);
        let stream_tx = accepts_event_stream(headers).then_some(stream_tx);
        // Counted as waiting before any request is written: the process may send its own
        // messages before this task runs again. (An `initialize` counts only once it is
        // forwarded: one waiting for another's answer must not take the process's messages.)
        let asks = messages.iter().flatten().any(|m| {
            let method = m.get("method").and_then(Value::as_str);
            m.contains_key("id") && method.is_some_and(|m| m != "initialize")
        });
        if asks {
            guard.wait_for_messages(stream_tx.clone());
        }
        let mut initialize = false;
        for msg in messages {
            let Some(mut msg) = msg else {
                answers.push(jsonrpc::error_message(
                    None,
                    jsonrpc::INVALID_REQUEST,
                    "not a JSON-RPC message",
                ));
                continue;
            };
            let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
            let id = msg.get("id").cloned();
            match (method.as_deref(), id) {
                (Some("initialize"), Some(id)) => {
                    initialize = true;
                    // One that comes while another's is answered waits for that answer; not for
                    // ever: a process that never answers must not keep every agent out.
                    let mut turn = None;
                    let mut cached = self.cached_init();
                    if cached.is_none() {
                        let next = self.init_turn.clone().lock_owned();
                        turn = tokio::time::timeout(WAIT_FOR_PROCESS, next).await.ok();
                        cached = self.cached_init();
                    }
                    if let Some(result) = cached {
                        answers.push(jsonrpc::result_message(&id.to_string(), &result));
                        continue;
                    }
                    let params = msg.get("params").cloned().unwrap_or(Value::Null);
                    if guard.waiting.is_none() {
                        guard.wait_for_messages(stream_tx.clone());
                    }
                    let (internal, rx) = self.register(&conn, &mut guard, &mut msg, None, None)?;
                    lock(&conn.initializing).insert(internal, (params, turn));
                    guard.unwritten = Some(internal);
                    self.write(&conn, msg).await?;
                    guard.unwritten = None;
                    waits.push((id, rx));
                }
                (Some(_), Some(id)) => {
                    let (progress, session) = (stream_tx.as_ref(), session.clone());
                    let (_, rx) = self.register(&conn, &mut guard, &mut msg, progress, session)?;
                    self.write(&conn, msg).await?;
                    waits.push((id, rx));
                }
                (None, Some(id)) => {
                    if take_question(&conn, &id) {
                        // Not awaited: taken, the answer must not be lost with a POST that goes
                        // away meanwhile.
                        conn.tell(Value::Object(msg).to_string());
                    } else {
                        tracing::debug!(upstream = %self.name, %id, "dropping an answer to no question of the process's in flight: answered already, or never asked");
                    }
                }
                (Some("notifications/initialized"), None)
                    if conn.initialized.swap(true, Ordering::Relaxed) =>
                {
                    // The process was told already (by another agent).
                }
                (Some("notifications/cancelled"), None)
                    if !retarget_cancellation(&conn, &mut msg, session.as_deref()) =>
                {
                    // Not one request in flight by that id: forwarded as it is, it could stop
                    // another agent's request that has it as its internal id.
                    tracing::debug!(upstream = %self.name, "dropping a cancellation of no request in flight");
                }
                _ => self.write(&conn, msg).await?,
            }
        }
        let listening = stream_tx.is_some() && !waits.is_empty();
        drop(stream_tx);
        let mut res = self
            .answer_post(guard, waits, answers, parsed.batch, listening, stream_rx)
            .await;
        if initialize && res.status() == StatusCode::OK {
            let id = uuid::Uuid::new_v4().simple().to_string();
            if let Ok(id) = HeaderValue::from_str(&id) {
                res.headers_mut().insert(MCP_SESSION_ID, id);
            }
        }
        Ok(res)
    }

    /// Answers a POST once its requests are written: with plain JSON when the answers come
    /// alone, with an event stream when progress or a message of the process's own comes first
    /// or with them (`listening`: the agent takes an event stream, and answers are awaited).
    async fn answer_post(
        &self,
        mut guard: PendingGuard,
        waits: Vec<Wait>,
        answered: Vec<String>,
        batch: bool,
        listening: bool,
        mut messages: mpsc::Receiver<String>,
    ) -> Response<Body> {
        let name = self.name.clone();
        let mut answers = Box::pin(async move {
            let mut all = answered;
            for (id, rx) in waits {
                all.push(answer(&name, id, rx).await);
            }
            all
        });
        let first = if listening {
            tokio::select! {
                biased;
                Some(first) = messages.recv() => Err(first),
                all = &mut answers => Ok(all),
            }
        } else {
            Ok(answers.as_mut().await)
        };
        let answers = match first {
            Ok(all) => all,
            Err(first) => return event_stream_answer(guard, answers, first, messages),
        };
        guard.answered = true;
        drop(guard);
        // A message queued just before the answers, or with them, goes first.
        messages.close();
        let mut all = Vec::new();
        while let Ok(m) = messages.try_recv() {
            all.push(m);
        }
        if !all.is_empty() {
            all.extend(answers);
            let events: Vec<u8> = all.iter().flat_map(|m| sse::message_event(m)).collect();
            return event_stream_response(Body::from(events));
        }
        if answers.is_empty() {
            let mut res = Response::new(Body::empty());
            *res.status_mut() = StatusCode::ACCEPTED;
            return res;
        }
        rescue::json_response(StatusCode::OK, jsonrpc::join(&answers, batch))
    }

    /// Renumbers a request (and its progress token, when there is somewhere to send its progress)
    /// and registers it, before it is written: the answer may come at once. Returns its internal id
    /// and where its answer will come.
    fn register(
        &self,
        conn: &Conn,
        guard: &mut PendingGuard,
        msg: &mut Map<String, Value>,
        progress: Option<&mpsc::Sender<String>>,
        session: Option<String>,
    ) -> Result<(u64, oneshot::Receiver<Map<String, Value>>), UpstreamFailed> {
        let internal = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            // Checked with `pending` locked, as the process's end clears it: a request is either
            // refused here or answered with an error then.
            let mut pending = lock(&conn.pending);
            if conn.closed.load(Ordering::Relaxed) {
                return Err(self.failed("the tool process exited"));
            }
            pending.insert(internal, tx);
        }
        guard.ids.push(internal);
        if let Some(agent_id) = msg.insert("id".into(), Value::from(internal)) {
            lock(&conn.agent_ids).insert(internal, (session, agent_id));
        }
        match progress {
            Some(progress) => {
                if let Some(token) = swap_progress_token(msg, internal) {
                    lock(&conn.progress).insert(internal, (token, progress.clone()));
                }
            }
            // Its progress could reach the agent nowhere, and its token, passed on as it is, could
            // be taken for another request's internal id.
            None => drop_progress_token(msg),
        }
        Ok((internal, rx))
    }

    async fn write(&self, conn: &Conn, msg: Map<String, Value>) -> Result<(), UpstreamFailed> {
        conn.stdin
            .send(Value::Object(msg).to_string())
            .await
            .map_err(|_| self.failed("the tool process exited"))
    }

    /// The running process, waiting a while for one that is (re)starting.
    async fn connection(&self) -> Result<Arc<Conn>, UpstreamFailed> {
        let mut rx = self.conn.subscribe();
        let wait = rx.wait_for(|c| c.as_ref().is_some_and(|c| c.ready.load(Ordering::Relaxed)));
        match tokio::time::timeout(WAIT_FOR_PROCESS, wait).await {
            Ok(Ok(conn)) => conn
                .clone()
                .ok_or_else(|| self.failed("the tool process is not running")),
            _ => Err(self.failed("the tool process is not running")),
        }
    }

    /// A GET stream of the process's own messages. One that resumes (`Last-Event-ID`) gets
    /// again the process's requests sent since that event that no agent has answered yet.
    ///
    /// It opens with those and the requests no agent could hear yet, then an event with an id
    /// and no data (the spec's priming event), so that an agent whose stream breaks before the
    /// next message can still resume from it.
    fn event_stream(&self, headers: &HeaderMap) -> Response<Body> {
        let resumed = headers
            .get(LAST_EVENT_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let conn = self.conn.borrow().clone();
        let (rx, last, first) = match &conn {
            // Subscribed with the queue locked, as `ask_streams` broadcasts a request or queues
            // it: the request comes either way, once.
            Some(conn) => {
                let queue = lock(&conn.unheard);
                let last = self.streams.last_event.load(Ordering::Relaxed);
                let rx = self.streams.events.subscribe();
                (rx, last, first_events(conn, queue, resumed))
            }
            None => {
                let last = self.streams.last_event.load(Ordering::Relaxed);
                (self.streams.events.subscribe(), last, Vec::new())
            }
        };
        let mut opening: Vec<u8> = first
            .iter()
            .flat_map(|(e, m)| sse::numbered_message_event(*e, m))
            .collect();
        opening.extend(format!("id: {last}\ndata: \n\n").into_bytes());
        let opening =
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(opening))]);
        let listener = Listener {
            rx,
            conn: self.conn.subscribe(),
            last,
            lagged: false,
        };
        let stream = futures_util::stream::unfold(listener, |mut listener| async move {
            let chunk = listener.next().await?;
            Some((Ok::<_, std::convert::Infallible>(chunk), listener))
        });
        event_stream_response(Body::from_stream(opening.chain(stream)))
    }

    /// The process's answer to the first agent's `initialize`, if it came.
    fn cached_init(&self) -> Option<Value> {
        lock(&self.init).as_ref().map(|c| c.result.clone())
    }
}

/// The events a GET stream opens with: the requests of the process's that no agent could hear,
/// and for a stream that resumes after the event `resumed`, the requests sent since that no
/// agent has answered yet; in the order they were sent.
fn first_events(
    conn: &Conn,
    mut queue: std::sync::MutexGuard<'_, Unheard>,
    resumed: Option<u64>,
) -> Vec<(u64, String)> {
    let mut first: Vec<(u64, String)> = queue
        .requests
        .drain(..)
        .map(|q| (q.event, q.line))
        .collect();
    if let Some(after) = resumed {
        for a in lock(&conn.asked).iter() {
            if let To::Streams(event) = a.to
                && event > after
                && !first.iter().any(|(e, _)| *e == event)
            {
                first.push((event, a.line.clone()));
            }
        }
        first.sort_by_key(|(e, _)| *e);
    }
    first
}

/// One agent's GET stream of the process's messages.
struct Listener {
    rx: broadcast::Receiver<(u64, String)>,
    conn: watch::Receiver<Option<Arc<Conn>>>,
    /// The id of the last event sent (or given before the stream opened).
    last: u64,
    /// Whether messages were missed since then.
    lagged: bool,
}

impl Listener {
    /// The next events, or `None` once the server is gone.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            match self.rx.recv().await {
                Ok((event, msg)) => {
                    let mut out = Vec::new();
                    if std::mem::take(&mut self.lagged) {
                        // The requests among the missed messages, that no agent has answered
                        // yet, are sent now.
                        let conn = self.conn.borrow().clone();
                        let missed = conn.map(|c| questions_between(&c, self.last, event));
                        for (e, line) in missed.unwrap_or_default() {
                            out.extend(sse::numbered_message_event(e, &line));
                        }
                    }
                    out.extend(sse::numbered_message_event(event, &msg));
                    self.last = event;
                    return Some(out.into());
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.lagged = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The process's requests sent to the GET streams as events between `after` and `before`
/// (neither included) that no agent has answered yet.
fn questions_between(conn: &Conn, after: u64, before: u64) -> Vec<(u64, String)> {
    let mut between: Vec<(u64, String)> = lock(&conn.asked)
        .iter()
        .filter_map(|a| match a.to {
            To::Streams(e) if e > after && e < before => Some((e, a.line.clone())),
            _ => None,
        })
        .collect();
    between.sort_by_key(|(e, _)| *e);
    between
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers a POST with an event stream: `first`, then the messages for it as they come, then
/// the answers. The agent hanging up forgets the requests.
fn event_stream_answer(
    mut guard: PendingGuard,
    mut answers: Pin<Box<impl Future<Output = Vec<String>> + Send + 'static>>,
    first: String,
    mut messages: mpsc::Receiver<String>,
) -> Response<Body> {
    let (out, rx) = mpsc::channel::<Bytes>(PROGRESS_BUFFER);
    let event = |m: &str| Bytes::from(sse::message_event(m));
    tokio::spawn(async move {
        if out.send(event(&first)).await.is_err() {
            return;
        }
        let answers = loop {
            tokio::select! {
                biased;
                Some(m) = messages.recv() => {
                    if out.send(event(&m)).await.is_err() {
                        return;
                    }
                }
                all = &mut answers => break all,
                _ = out.closed() => return,
            }
        };
        // No longer waiting: the process's next messages go elsewhere, while those queued,
        // written before or with the answers, go first.
        let (conn, key) = (guard.conn.clone(), guard.waiting);
        guard.answered = true;
        drop(guard);
        messages.close();
        while let Some(m) = messages.recv().await {
            if out.send(event(&m)).await.is_err() {
                // Hung up before the process's requests given to this POST went out.
                if let Some(key) = key {
                    abandon_questions(&conn, key);
                }
                return;
            }
        }
        for a in answers {
            if out.send(event(&a)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    event_stream_response(Body::from_stream(stream))
}

fn event_stream_response(body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res
}

/// A forwarded request: the agent's id, and where its answer comes.
type Wait = (Value, oneshot::Receiver<Map<String, Value>>);

/// The answer to one forwarded request, under the agent's id.
async fn answer(name: &str, id: Value, rx: oneshot::Receiver<Map<String, Value>>) -> String {
    match rx.await {
        Ok(mut reply) => {
            reply.insert("id".into(), id);
            Value::Object(reply).to_string()
        }
        Err(_) => jsonrpc::error_message(
            Some(&id.to_string()),
            jsonrpc::INTERNAL_ERROR,
            &format!("the tool server `{name}` exited before answering; it is being restarted"),
        ),
    }
}

/// Whether the agent takes an event stream as the answer to its POST.
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.split(';').next().unwrap_or("").trim();
            t.eq_ignore_ascii_case("text/event-stream")
        })
}

/// Points a `notifications/cancelled` at the internal id of the request it names, if exactly one
/// request in flight has that id in the agent's session (agents without a session id are told
/// apart by nothing else). Says whether it did.
fn retarget_cancellation(conn: &Conn, msg: &mut Map<String, Value>, session: Option<&str>) -> bool {
    let Some(target) = msg.get_mut("params").and_then(|p| p.get_mut("requestId")) else {
        return false;
    };
    let agent_ids = lock(&conn.agent_ids);
    let mut matching = agent_ids
        .iter()
        .filter(|(_, (s, a))| s.as_deref() == session && a == target);
    match (matching.next(), matching.next()) {
        (Some((internal, _)), None) => {
            *target = Value::from(*internal);
            true
        }
        _ => false,
    }
}

/// A request's `params._meta`, where its progress token is.
fn meta(msg: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    msg.get_mut("params")?.get_mut("_meta")?.as_object_mut()
}

/// Removes a request's progress token, if it has one.
fn drop_progress_token(msg: &mut Map<String, Value>) {
    if let Some(meta) = meta(msg) {
        meta.remove("progressToken");
    }
}

/// Replaces a request's progress token with `internal`, returning the agent's.
fn swap_progress_token(msg: &mut Map<String, Value>, internal: u64) -> Option<Value> {
    let token = meta(msg)?.get_mut("progressToken")?;
    Some(std::mem::replace(token, Value::from(internal)))
}

/// Forgets a request's pending entry when its caller goes away (a deadline, a client that hung
/// up), so that nothing accumulates.
struct PendingGuard {
    conn: Arc<Conn>,
    ids: Vec<u64>,
    /// The key of the POST's entry in [`Conn::waiting`], if it has one.
    waiting: Option<u64>,
    /// Whether the POST got its answers; if not, its agent hung up.
    answered: bool,
    /// An `initialize` registered and not yet written: taken back, its turn given up, if the
    /// POST ends before it is.
    unwritten: Option<u64>,
}

impl PendingGuard {
    /// Counts the POST as waiting for answers: the process's messages may go on its answer
    /// (to `messages`, if its agent takes an event stream).
    fn wait_for_messages(&mut self, messages: Option<mpsc::Sender<String>>) {
        let key = self.conn.next_waiting.fetch_add(1, Ordering::Relaxed);
        lock(&self.conn.waiting).insert(key, messages);
        self.waiting = Some(key);
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = lock(&self.conn.pending);
        for id in &self.ids {
            pending.remove(id);
        }
        drop(pending);
        let mut progress = lock(&self.conn.progress);
        for id in &self.ids {
            progress.remove(id);
        }
        drop(progress);
        let mut agent_ids = lock(&self.conn.agent_ids);
        for id in &self.ids {
            agent_ids.remove(id);
        }
        drop(agent_ids);
        // The turn of an `initialize` is given up when it is answered, or here when it never
        // will be: not written, or written to a process that has ended.
        let mut initializing = lock(&self.conn.initializing);
        if let Some(id) = self.unwritten {
            initializing.remove(&id);
        }
        if self.conn.closed.load(Ordering::Relaxed) {
            for id in &self.ids {
                initializing.remove(id);
            }
        }
        drop(initializing);
        if let Some(key) = self.waiting {
            lock(&self.conn.waiting).remove(&key);
            if !self.answered {
                abandon_questions(&self.conn, key);
            }
        }
    }
}

/// The command line that runs `command` under an address-space limit of `mb` MiB, without
/// unsafe code in this process: the shell sets the limit and then becomes the server.
fn command_line(command: &[String], memory_mb: Option<u64>) -> Command {
    let mut cmd = match memory_mb {
        Some(mb) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(format!(
                    "ulimit -v {} && exec \"$0\" \"$@\"",
                    mb.saturating_mul(1024)
                ))
                .args(command);
            c
        }
        None => {
            let mut c = Command::new(&command[0]);
            c.args(&command[1..]);
            c
        }
    };
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

async fn supervise(
    server: Arc<StdioServer>,
    command: Vec<String>,
    policies: Arc<Policies>,
    max_line: usize,
    shutdown: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    while !shutdown.is_cancelled() {
        let memory_mb = policies.current().ok().and_then(|a| {
            let l = a.set.limits().max_memory_mb.as_ref()?;
            (l.enforcement == Enforcement::Strict).then_some(l.value)
        });
        let started = Instant::now();
        match command_line(&command, memory_mb).spawn() {
            Ok(child) => {
                tracing::info!(upstream = %server.name, pid = child.id(), memory_mb, "tool process started");
                run_once(&server, child, max_line, &shutdown).await;
            }
            Err(e) => {
                tracing::error!(upstream = %server.name, command = ?command, error = %e, "cannot start the tool process");
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        if started.elapsed() > HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(upstream = %server.name, retry_in_ms = backoff.as_millis() as u64, "tool process exited; restarting");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs one process until it exits or the sidecar stops.
async fn run_once(
    server: &StdioServer,
    mut child: Child,
    max_line: usize,
    shutdown: &CancellationToken,
) {
    let pid = child.id();
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        kill_group(pid);
        let _ = child.wait().await;
        return;
    };
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let conn = Arc::new(Conn::new(tx, server.init.clone()));
    let writer = tokio::spawn(async move {
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
    });
    let reader_conn = conn.clone();
    let streams = server.streams.clone();
    let name = server.name.clone();
    let mut reader = tokio::spawn(async move {
        let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(max_line));
        while let Some(line) = lines.next().await {
            match line {
                Ok(line) => dispatch(&reader_conn, &streams, &line),
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    tracing::warn!(upstream = %name, limit = max_line, "the tool process wrote a message larger than the limit");
                    // Its request cannot be told apart: fail all, rather than leave one hanging.
                    // (An `initialize` among them gives up its turn uncached: the next agent
                    // initializes the process again, rather than wait on an answer lost.)
                    lock(&reader_conn.pending).clear();
                    lock(&reader_conn.initializing).clear();
                }
                Err(LinesCodecError::Io(e)) => {
                    tracing::warn!(upstream = %name, error = %e, "reading from the tool process failed");
                    break;
                }
            }
        }
    });

    // Replay the agent's initialize on a restarted process, before any agent may use it. Its
    // GET streams may: a server can ask for the roots as soon as it is initialized.
    server.conn.send_replace(Some(conn.clone()));
    let replay = lock(&server.init).as_ref().map(|c| c.params.clone());
    let ok = match replay {
        Some(params) => replay_initialize(server, &conn, params).await,
        None => true,
    };
    if ok {
        conn.ready.store(true, Ordering::Relaxed);
        server.conn.send_modify(|_| {});
    } else {
        // Unusable without it: started again (the reader ends with the process).
        server.conn.send_replace(None);
        kill_group(pid);
    }
    tokio::select! {
        _ = &mut reader => {}
        _ = shutdown.cancelled() => {}
    }
    server.conn.send_replace(None);
    conn.closed.store(true, Ordering::Relaxed);
    // Dropping the senders tells every waiting caller that the process is gone.
    lock(&conn.pending).clear();
    lock(&conn.progress).clear();
    lock(&conn.waiting).clear();
    // Agents waiting to initialize go on; the next process is initialized by the replay.
    lock(&conn.initializing).clear();
    kill_group(pid);
    reader.abort();
    writer.abort();
    match child.wait().await {
        Ok(status) => tracing::info!(upstream = %server.name, %status, "tool process ended"),
        Err(e) => {
            tracing::warn!(upstream = %server.name, error = %e, "waiting for the tool process failed")
        }
    }
}

async fn replay_initialize(server: &StdioServer, conn: &Conn, params: Value) -> bool {
    let internal = server.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock(&conn.pending).insert(internal, tx);
    let request = serde_json::json!({"jsonrpc": "2.0", "id": internal, "method": "initialize", "params": params});
    if conn.stdin.send(request.to_string()).await.is_err() {
        return false;
    }
    match tokio::time::timeout(WAIT_FOR_PROCESS, rx).await {
        Ok(Ok(_)) => {
            let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
            conn.initialized.store(true, Ordering::Relaxed);
            conn.stdin.send(note.to_owned()).await.is_ok()
        }
        _ => {
            tracing::warn!(upstream = %server.name, "the restarted tool process did not answer initialize");
            false
        }
    }
}

/// Routes one line from the process: an answer to its caller, progress to the stream of the
/// request it is about, a request or a log message of its own to the one POST waiting for
/// answers, anything else to GET streams.
fn dispatch(conn: &Arc<Conn>, streams: &Streams, line: &str) {
    let Ok(mut msg) = serde_json::from_str::<Map<String, Value>>(line) else {
        tracing::debug!(line, "ignoring a line that is not a JSON-RPC message");
        return;
    };
    // A CR in the line (JSON whitespace to the process) would end a line for the agent's
    // event-stream parser: such a message goes on re-serialised.
    let reserialised;
    let line = if line.contains('\r') {
        reserialised = Value::Object(msg.clone()).to_string();
        reserialised.as_str()
    } else {
        line
    };
    let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
    let Some(method) = method else {
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            answered(conn, id, msg);
        }
        return;
    };
    match method.as_str() {
        "notifications/progress" => {
            let token = msg
                .get_mut("params")
                .and_then(|p| p.get_mut("progressToken"));
            if let Some(token) = token {
                let caller = token
                    .as_u64()
                    .and_then(|t| lock(&conn.progress).get(&t).cloned());
                if let Some((original, tx)) = caller {
                    *token = original;
                    // Progress is advisory: a notification the agent is too slow for is dropped.
                    let _ = tx.try_send(Value::Object(msg).to_string());
                    return;
                }
            }
        }
        "notifications/cancelled" => {
            let cancelled = msg.get("params").and_then(|p| p.get("requestId"));
            if let Some(id) = cancelled {
                cancel_question(conn, streams, &id.to_string(), line);
                return;
            }
        }
        _ => {}
    }
    // Requests and log messages are about a request of some agent's, if any; other notifications
    // (a tool list that changed, ...) are for every agent.
    let id = msg.get("id").map(Value::to_string);
    if id.is_some() || method == "notifications/message" {
        let waiting = lock(&conn.waiting);
        if let (1, Some((key, Some(post)))) = (waiting.len(), waiting.iter().next()) {
            // Kept before it is sent: the agent may answer at once.
            if let Some(id) = &id {
                let mut queue = lock(&conn.unheard);
                keep_question(conn, &mut queue, id, line, To::Post(*key));
            }
            if post.try_send(line.to_owned()).is_ok() {
                return;
            }
        }
    }
    match id {
        Some(id) => ask_streams(conn, streams, id, line.to_owned()),
        // Nobody listening is fine for notifications: they are optional for the server to deliver.
        None => streams.notify(line.to_owned()),
    }
}

/// Hands the process's answer to the request `internal` to its caller; the first answer to an
/// `initialize` is cached.
fn answered(conn: &Conn, internal: u64, msg: Map<String, Value>) {
    // The turn is given up once the answer is cached.
    let initialize = lock(&conn.initializing).remove(&internal);
    if let (Some((params, _turn)), Some(result)) = (initialize, msg.get("result")) {
        let mut init = lock(&conn.init);
        if init.is_none() {
            *init = Some(InitCache {
                params,
                result: result.clone(),
            });
        }
    }
    if let Some(tx) = lock(&conn.pending).remove(&internal) {
        let _ = tx.send(msg);
    }
}

/// Keeps a request of the process's until an agent answers it. Beyond [`MAX_ASKED`], the
/// oldest is answered with an error (and taken from `queue` if it waits there).
fn keep_question(conn: &Conn, queue: &mut Unheard, id: &str, line: &str, to: To) {
    let mut asked = lock(&conn.asked);
    asked.retain(|a| a.id != id);
    let oldest = (asked.len() >= MAX_ASKED)
        .then(|| asked.pop_front())
        .flatten();
    asked.push_back(Asked {
        id: id.to_owned(),
        line: line.to_owned(),
        to,
    });
    drop(asked);
    if let Some(oldest) = oldest {
        queue.requests.retain(|q| q.id != oldest.id);
        let message = "no agent can answer: too many requests wait for an answer";
        let error = jsonrpc::error_message(Some(&oldest.id), jsonrpc::INTERNAL_ERROR, message);
        conn.tell(error);
    }
}

/// Forgets the process's request that an agent answers, saying whether it was still waiting
/// for an answer (only the first answer reaches the process).
fn take_question(conn: &Conn, id: &Value) -> bool {
    let id = id.to_string();
    let mut queue = lock(&conn.unheard);
    queue.requests.retain(|q| q.id != id);
    let mut asked = lock(&conn.asked);
    let at = asked.iter().position(|a| a.id == id);
    at.and_then(|at| asked.remove(at)).is_some()
}

/// Asks the agents' GET streams a request of the process's; keeps it for the next stream if
/// none is open.
fn ask_streams(conn: &Arc<Conn>, streams: &Streams, id: String, line: String) {
    // The queue stays locked until the request is in, so that a GET stream opening meanwhile gets
    // it (see `event_stream`).
    let mut queue = lock(&conn.unheard);
    // Kept before it is sent: an agent may answer at once.
    let event = streams.next_event();
    keep_question(conn, &mut queue, &id, &line, To::Streams(event));
    if !streams.send(event, line.clone()) {
        unheard(conn, &mut queue, event, id, line);
    }
}

/// Keeps a request of the process's that no agent could hear for the next GET stream; answers
/// the process with an error if none comes in time.
fn unheard(conn: &Arc<Conn>, queue: &mut Unheard, event: u64, id: String, line: String) {
    if queue.requests.len() >= MAX_UNHEARD {
        refuse_question(conn, &id, "none is connected to receive this request");
        return;
    }
    queue.requests.push_back(Queued { event, id, line });
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let conn = conn.clone();
    rt.spawn(async move {
        tokio::time::sleep(UNHEARD_TIMEOUT).await;
        let still_unheard = {
            let mut queue = lock(&conn.unheard);
            let at = queue.requests.iter().position(|q| q.event == event);
            at.and_then(|at| queue.requests.remove(at))
        };
        if let Some(q) = still_unheard {
            refuse_question(&conn, &q.id, "none is connected to receive this request");
        }
    });
}

/// Answers a request of the process's with an error that says why no agent can answer it.
fn refuse_question(conn: &Conn, id: &str, why: &str) {
    let mut asked = lock(&conn.asked);
    let at = asked.iter().position(|a| a.id == id);
    if at.and_then(|at| asked.remove(at)).is_none() {
        // Answered meanwhile.
        return;
    }
    drop(asked);
    let message = format!("no agent can answer: {why}");
    conn.tell(jsonrpc::error_message(
        Some(id),
        jsonrpc::INTERNAL_ERROR,
        &message,
    ));
}

/// Answers with an error the process's requests that went on the answer to the POST `key`,
/// whose agent hung up before it could answer them.
fn abandon_questions(conn: &Conn, key: u64) {
    let ids: Vec<String> = lock(&conn.asked)
        .iter()
        .filter(|a| a.to == To::Post(key))
        .map(|a| a.id.clone())
        .collect();
    for id in ids {
        refuse_question(conn, &id, "the agent it was sent to hung up");
    }
}

/// Routes the process's cancellation of its request `id` (JSON text) the way the request went,
/// and forgets the request. A request nobody heard is taken back, and its cancellation goes
/// nowhere; so does one of a request no longer waiting for an answer.
fn cancel_question(conn: &Conn, streams: &Streams, id: &str, line: &str) {
    let waiting = lock(&conn.waiting);
    let mut queue = lock(&conn.unheard);
    let mut asked = lock(&conn.asked);
    let Some(at) = asked.iter().position(|a| a.id == id) else {
        return;
    };
    let post = match asked.remove(at).map(|a| a.to) {
        Some(To::Post(key)) => Some(key),
        _ => None,
    };
    drop(asked);
    let queued = queue.requests.iter().position(|q| q.id == id);
    if queued.and_then(|at| queue.requests.remove(at)).is_some() {
        return;
    }
    drop(queue);
    if let Some(Some(post)) = post.and_then(|key| waiting.get(&key))
        && post.try_send(line.to_owned()).is_ok()
    {
        return;
    }
    streams.notify(line.to_owned());
}

fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    // The group may be gone already; there is nothing more to do then.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Arc<Conn>, mpsc::Receiver<String>) {
        let (stdin, written) = mpsc::channel(8);
        (Arc::new(Conn::new(stdin, Arc::default())), written)
    }

    fn post_guard(conn: &Arc<Conn>, key: u64, answered: bool) -> PendingGuard {
        lock(&conn.waiting).insert(key, None);
        PendingGuard {
            conn: conn.clone(),
            ids: Vec::new(),
            waiting: Some(key),
            answered,
            unwritten: None,
        }
    }

    const QUESTION: &str = r#"{"jsonrpc":"2.0","id":7,"method":"roots/list"}"#;

    #[test]
    fn only_the_first_answer_to_a_question_reaches_the_process() {
        let (conn, _) = conn();
        keep_question(
            &conn,
            &mut Unheard::default(),
            "7",
            QUESTION,
            To::Streams(1),
        );
        // Ids are compared as JSON: "7" is another request's.
        assert!(!take_question(&conn, &Value::from("7")));
        assert!(take_question(&conn, &Value::from(7)));
        assert!(!take_question(&conn, &Value::from(7)));
    }

    #[tokio::test]
    async fn a_question_whose_post_hung_up_gets_an_error_and_no_other() {
        let (conn, mut written) = conn();
        let mut queue = Unheard::default();
        keep_question(&conn, &mut queue, "7", QUESTION, To::Post(3));
        keep_question(&conn, &mut queue, "8", QUESTION, To::Streams(1));
        drop(post_guard(&conn, 3, false));
        let told: Value = serde_json::from_str(&written.recv().await.unwrap()).unwrap();
        assert_eq!(told["id"], 7);
        let message = told["error"]["message"].as_str().unwrap();
        assert!(message.contains("hung up"), "{message}");
        assert!(written.try_recv().is_err());
        assert!(!take_question(&conn, &Value::from(7)));
        assert!(take_question(&conn, &Value::from(8)));

        // A POST that got its answers leaves its questions for its agent to answer.
        keep_question(&conn, &mut queue, "9", QUESTION, To::Post(4));
        drop(post_guard(&conn, 4, true));
        assert!(written.try_recv().is_err());
        assert!(take_question(&conn, &Value::from(9)));
    }

    #[tokio::test]
    async fn an_ended_process_takes_no_request_and_holds_no_initialize_turn() {
        let server = StdioServer::new("local".into());
        let (conn, _written) = conn();
        let turn = || {
            Some(
                server
                    .init_turn
                    .clone()
                    .try_lock_owned()
                    .expect("the turn is free"),
            )
        };
        let mut guard = post_guard(&conn, 1, false);
        let mut msg = Map::new();
        let (internal, _) = server
            .register(&conn, &mut guard, &mut msg, None, None)
            .unwrap();
        // An `initialize` registered, never written: the POST ending gives its turn up.
        lock(&conn.initializing).insert(internal, (Value::Null, turn()));
        guard.unwritten = Some(internal);
        drop(guard);
        assert!(lock(&conn.initializing).is_empty());

        // One written to a process that then ended: its POST ending gives the turn up.
        let mut guard = post_guard(&conn, 2, false);
        let (internal, _) = server
            .register(&conn, &mut guard, &mut msg, None, None)
            .unwrap();
        lock(&conn.initializing).insert(internal, (Value::Null, turn()));
        conn.closed.store(true, Ordering::Relaxed);
        drop(guard);
        assert!(lock(&conn.initializing).is_empty());

        // Nothing more is registered on it.
        let mut guard = post_guard(&conn, 3, false);
        let refused = server.register(&conn, &mut guard, &mut msg, None, None);
        assert!(refused.is_err());
        assert!(lock(&conn.pending).is_empty());
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_question_gets_an_error() {
        let (conn, mut written) = conn();
        let mut queue = Unheard::default();
        for id in 0..=MAX_ASKED {
            let id = id.to_string();
            queue.requests.push_back(Queued {
                event: 0,
                id: id.clone(),
                line: QUESTION.into(),
            });
            keep_question(&conn, &mut queue, &id, QUESTION, To::Streams(0));
        }
        let told: Value = serde_json::from_str(&written.recv().await.unwrap()).unwrap();
        assert_eq!(told["id"], 0);
        assert!(
            told["error"]["message"]
                .as_str()
                .unwrap()
                .contains("too many")
        );
        assert!(written.try_recv().is_err());
        assert_eq!(queue.requests.len(), MAX_ASKED);
        assert!(!take_question(&conn, &Value::from(0)));
        assert!(take_question(&conn, &Value::from(1)));
    }
}

//! MCP Streamable HTTP at `/mcp/{name}`: each POST is parsed once, every `tools/call` in it
//! judged ([`policy_check`]), the rest forwarded, and the answers inspected on the way back
//! ([`output_filter`]), whether they come as one JSON body or as a stream of events. Only
//! `tools/call` and `tools/list` are judged; everything else passes through untouched.
//!
//! The order for one POST: read (capped) → parse → judge each call → forward what is allowed
//! (under the deadline) → inspect each answer → add the sidecar's own answers.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::BodyExt;
use perfecx_policy::{Content, Enforcement};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::Shared;
use super::calls::{Finish, Pending, Tracker};
use super::denial::{
    DeadlineExceeded, FailClosed, Refusal, SlowClient, Unjudgeable, UpstreamFailed,
};
use super::events::Checked;
use super::jsonrpc::{self, Reply, Request as Rpc};
use super::output_filter::{OutputVerdict, check_output, judge_tools};
use super::policies::Active;
use super::policy_check::{CallVerdict, check_call, hide_forbidden_tools};
use super::rescue;
use super::sse;
use super::upstream::{
    ReadError, Transport, Upstream, as_json, content_coding, media_type_is, read_limited,
    refuse_compressed_request, send_http,
};

/// How long a client may take to send its request body.
pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn handle(shared: Arc<Shared>, up: Arc<Upstream>, req: Request<Body>) -> Response<Body> {
    match *req.method() {
        Method::POST | Method::GET | Method::DELETE => {
            if let Err(compressed) = refuse_compressed_request(req.headers()) {
                let refusal = Refusal::from(compressed);
                tracing::warn!(upstream = %up.name, error = %refusal, "request refused");
                return rescue::rpc_http_error(&refusal);
            }
            if req.method() == Method::POST {
                post(&shared, &up, req).await
            } else {
                other(&shared, &up, req).await
            }
        }
        _ => {
            let mut res = rescue::json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                jsonrpc::error_message(None, jsonrpc::INVALID_REQUEST, "use POST, GET or DELETE"),
            );
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, GET, DELETE"));
            res
        }
    }
}

/// Sends a request to the MCP server behind `up`, whichever transport it uses.
async fn send(
    shared: &Shared,
    up: &Upstream,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, UpstreamFailed> {
    match &up.transport {
        Transport::Mcp(uri) => {
            send_http(&shared.client, up, method, uri.clone(), headers, body).await
        }
        Transport::Stdio(server) => server.send(method, &headers, body).await,
        Transport::Http(_) => Err(UpstreamFailed {
            upstream: up.name.to_string(),
            reason: "is a plain HTTP tool, not an MCP server".into(),
        }),
    }
}

/// Reads the agent's body, or answers why not.
pub async fn read_request(body: Body, cap: u64) -> Result<Bytes, Response<Body>> {
    match tokio::time::timeout(CLIENT_BODY_TIMEOUT, read_limited(body, cap, "request body")).await {
        Err(_) => Err(rescue::json_response(
            StatusCode::REQUEST_TIMEOUT,
            rescue::request_error(
                None,
                &SlowClient {
                    waited: CLIENT_BODY_TIMEOUT,
                }
                .into(),
            ),
        )),
        Ok(Err(ReadError::TooLarge(t))) => Err(rescue::json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            rescue::request_error(None, &t.into()),
        )),
        Ok(Err(ReadError::Failed(m))) => Err(rescue::json_response(
            StatusCode::BAD_REQUEST,
            jsonrpc::error_message(
                None,
                jsonrpc::PARSE_ERROR,
                &format!("cannot read the body: {m}"),
            ),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

async fn post(shared: &Arc<Shared>, up: &Arc<Upstream>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let active = shared.policies.current();
    let cap = shared.body_cap(active.as_deref().ok());
    let bytes = match read_request(body, cap).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let parsed = match jsonrpc::parse_body(&bytes) {
        Ok(p) => p,
        Err(m) => {
            return rescue::json_response(
                StatusCode::BAD_REQUEST,
                jsonrpc::error_message(None, jsonrpc::PARSE_ERROR, &m.0),
            );
        }
    };

    // Judge: each message is forwarded as it is, forwarded rewritten, or answered here.
    let mut tracker = shared.tracker(up.name.clone());
    let set = active.as_deref().ok().map(|a| &a.set);
    let mut forward: Vec<String> = Vec::with_capacity(parsed.messages.len());
    let mut local: Vec<String> = Vec::new();
    let mut modified = false;
    for msg in &parsed.messages {
        match jsonrpc::classify_message(msg) {
            Rpc::ToolCall {
                id,
                tool,
                arguments,
            } => {
                let id = jsonrpc::id_key(id);
                if same_id(&tracker, &id, &mut local) {
                    modified = true;
                    continue;
                }
                let span = tracker.span(&tool);
                let verdict = span.in_scope(|| match &active {
                    Ok(a) => check_call(a, &tracker, &tool, Content::Json(arguments)),
                    Err(no) => CallVerdict::Refuse(
                        FailClosed {
                            reason: no.reason.clone(),
                        }
                        .into(),
                    ),
                });
                let verdict = match verdict {
                    CallVerdict::ForwardRedacted(args) => {
                        match jsonrpc::with_arguments(msg.get(), &args) {
                            Some(m) => {
                                let input = tracker.capture(set, &args, true, Checked::Yes);
                                Ok(Some((m, input)))
                            }
                            None => Err(Refusal::from(Unjudgeable {
                                reason: "the redacted arguments could not be written back".into(),
                            })),
                        }
                    }
                    CallVerdict::Forward => Ok(None),
                    CallVerdict::Refuse(r) => Err(r),
                };
                match verdict {
                    Ok(None) => {
                        forward.push(msg.get().to_owned());
                        let input = tracker.capture(set, arguments, true, Checked::Yes);
                        tracker.start_call(id, &tool, false, span, input);
                    }
                    Ok(Some((rewritten, input))) => {
                        forward.push(rewritten);
                        modified = true;
                        tracker.start_call(id, &tool, true, span, input);
                    }
                    Err(refusal) => {
                        tracker.refused(&tool, &refusal, span);
                        local.push(rescue::tool_call_answer(&id, &refusal));
                        modified = true;
                    }
                }
            }
            Rpc::BadToolCall { id, reason } => {
                let refusal = Refusal::from(Unjudgeable { reason });
                tracker.refused("", &refusal, tracker.span(""));
                // A notification gets no answer; it is dropped all the same.
                if let Some(id) = id {
                    local.push(rescue::request_error(Some(id.get()), &refusal));
                }
                modified = true;
            }
            Rpc::Invalid { reason } => {
                let refusal = Refusal::from(Unjudgeable { reason });
                tracing::warn!(upstream = %up.name, error = %refusal, "unreadable message refused");
                // Not a request object JSON-RPC knows: its error for that, not for bad params.
                local.push(jsonrpc::error_message(
                    None,
                    jsonrpc::INVALID_REQUEST,
                    &refusal.to_string(),
                ));
                modified = true;
            }
            Rpc::ToolsList { id } => {
                if let Err(no) = &active {
                    let refusal = Refusal::from(FailClosed {
                        reason: no.reason.clone(),
                    });
                    local.push(rescue::request_error(Some(id.get()), &refusal));
                    modified = true;
                } else {
                    let id = jsonrpc::id_key(id);
                    if same_id(&tracker, &id, &mut local) {
                        modified = true;
                        continue;
                    }
                    tracker.start(id, Pending::List);
                    forward.push(msg.get().to_owned());
                }
            }
            Rpc::OtherRequest { id } => {
                let id = jsonrpc::id_key(id);
                if same_id(&tracker, &id, &mut local) {
                    modified = true;
                    continue;
                }
                tracker.start(id, Pending::Other);
                forward.push(msg.get().to_owned());
            }
            Rpc::Other => forward.push(msg.get().to_owned()),
        }
    }
    // A call or tool list under the id of a request whose stream was cut: its answer must not
    // pass for that request's on a resumed stream.
    if let Some(session) = parts.headers.get(MCP_SESSION_ID) {
        shared
            .unanswered
            .forget(&up.name, session, |id| tracker.judges(id));
    }
    let batch = parsed.batch;
    if forward.is_empty() {
        if local.is_empty() {
            return accepted();
        }
        return rescue::json_response(StatusCode::OK, jsonrpc::join(&local, batch));
    }
    let out = if modified {
        Bytes::from(jsonrpc::join(&forward, batch))
    } else {
        bytes.clone()
    };
    drop(parsed);
    let active = active.ok();

    // Forward, under the deadline when a call is in it.
    let deadline = match &active {
        Some(a) if tracker.has_calls() => {
            tracker.alert_after(a);
            deadline(a)
        }
        _ => None,
    };
    let mut resume = Resume::new(shared, up, &parts.headers);
    let sending = send(shared, up, parts.method, parts.headers, out);
    let sent = match &deadline {
        Some((at, refusal)) => match tokio::time::timeout_at(*at, sending).await {
            Ok(r) => r.map_err(Refusal::from),
            Err(_) => Err(refusal.clone()),
        },
        None => sending.await.map_err(Refusal::from),
    };
    let res = match sent {
        Ok(res) => res,
        Err(refusal) => {
            tracing::warn!(upstream = %up.name, error = %refusal, "forwarding failed");
            local.extend(tracker.fail_all(&refusal));
            return answers(local, batch, &refusal);
        }
    };

    // Inspect the answers.
    let status = res.status();
    if status == StatusCode::ACCEPTED || status == StatusCode::NO_CONTENT {
        if local.is_empty() {
            return without_body(res);
        }
        return rescue::json_response(StatusCode::OK, jsonrpc::join(&local, batch));
    }
    if !status.is_success() {
        // The session may be gone (404) and the client must see it to start again; pending
        // calls are counted as errors when the tracker drops.
        return judged_http(res, &tracker, active.as_deref(), cap).await;
    }
    if media_type_is(res.headers(), "text/event-stream") {
        if let Some(r) = resume.as_mut() {
            r.session_from(res.headers());
        }
        return event_stream(res, tracker, active, deadline, local, cap, resume);
    }
    // Any other media type is read as JSON all the same when answers are awaited: an answer
    // must not reach the agent uninspected because of its label.
    if media_type_is(res.headers(), "application/json") || tracker.has_pending() {
        return json_answer(res, tracker, active.as_deref(), deadline, local, batch, cap).await;
    }
    without_body(res)
}

/// An answer with nothing asked of it (to notifications and responses, or to a DELETE), passed
/// on without its body: clients read none there, and what it held was never judged.
fn without_body(res: Response<Body>) -> Response<Body> {
    let (mut parts, _) = res.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    Response::from_parts(parts, Body::empty())
}

fn accepted() -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::ACCEPTED;
    res
}

/// The deadline of a forwarded call under a strict `max_execution_time_ms`, and the refusal
/// that answers it.
fn deadline(active: &Active) -> Option<(Instant, Refusal)> {
    let limit = active.set.limits().max_execution_time_ms.as_ref()?;
    if limit.enforcement != Enforcement::Strict {
        return None;
    }
    let at = Instant::now() + Duration::from_millis(limit.value);
    let refusal = DeadlineExceeded {
        limit_ms: limit.value,
        policy: limit.policy.clone(),
    };
    Some((at, refusal.into()))
}

/// The sidecar's own answers, or the refusal as an HTTP error when there is nobody to answer.
fn answers(local: Vec<String>, batch: bool, refusal: &Refusal) -> Response<Body> {
    if local.is_empty() {
        return rescue::http_error(refusal);
    }
    rescue::json_response(
        StatusCode::OK,
        jsonrpc::join(&local, batch || local.len() > 1),
    )
}

async fn json_answer(
    res: Response<Body>,
    mut tracker: Tracker,
    active: Option<&Active>,
    deadline: Option<(Instant, Refusal)>,
    mut local: Vec<String>,
    batch: bool,
    cap: u64,
) -> Response<Body> {
    let (parts, body) = res.into_parts();
    let reading = read_limited(body, cap, "tool server's response");
    let read = match &deadline {
        Some((at, refusal)) => match tokio::time::timeout_at(*at, reading).await {
            Ok(r) => r,
            Err(_) => {
                local.extend(tracker.fail_all(refusal));
                return answers(local, batch, refusal);
            }
        },
        None => reading.await,
    };
    let upstream = tracker.upstream().to_owned();
    let failed = |reason: String| {
        Refusal::from(UpstreamFailed {
            upstream: upstream.clone(),
            reason,
        })
    };
    let bytes = match read {
        Ok(b) => b,
        Err(ReadError::TooLarge(t)) => {
            let refusal = failed(Refusal::from(t).to_string());
            local.extend(tracker.fail_all(&refusal));
            return answers(local, batch, &refusal);
        }
        Err(ReadError::Failed(m)) => {
            let refusal = failed(format!("the response broke off: {m}"));
            local.extend(tracker.fail_all(&refusal));
            return answers(local, batch, &refusal);
        }
    };
    let parsed = match jsonrpc::parse_body(&bytes) {
        Ok(p) => p,
        Err(m) => {
            let refusal = failed(format!(
                "it answered something that is not JSON-RPC: {}",
                m.0
            ));
            local.extend(tracker.fail_all(&refusal));
            return answers(local, batch, &refusal);
        }
    };
    let (mut out, mut changed) = inspect_all(&mut tracker, active, &parsed);
    let reply_batch = parsed.batch;
    drop(parsed);
    if tracker.has_pending() {
        // Requests the server did not answer (or answered unreadably) still get an answer.
        let refusal = failed("it did not answer every request".into());
        out.extend(tracker.fail_all(&refusal));
        changed = true;
    }
    // Read as UTF-8 JSON here, so said to be that: a client must not decode it otherwise.
    let mut parts = parts;
    let json = HeaderValue::from_static("application/json");
    parts.headers.insert(header::CONTENT_TYPE, json);
    if !changed && local.is_empty() {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let as_batch = reply_batch || !local.is_empty();
    out.append(&mut local);
    Response::from_parts(parts, Body::from(jsonrpc::join(&out, as_batch)))
}

#[derive(Deserialize)]
struct ResultFlags {
    #[serde(default, rename = "isError")]
    is_error: bool,
}

/// The members by which a client could take a result for a tool call's or a tool list's
/// (`toolResult` is the older protocol's). Each is seen whatever its value, `null` included.
#[derive(Deserialize)]
struct ToolShaped {
    #[serde(default)]
    content: Seen,
    #[serde(default, rename = "structuredContent")]
    structured: Seen,
    #[serde(default, rename = "isError")]
    is_error: Seen,
    #[serde(default)]
    tools: Seen,
    #[serde(default, rename = "toolResult")]
    tool_result: Seen,
}

/// Whether a member was there.
#[derive(Default)]
struct Seen(bool);

impl<'de> Deserialize<'de> for Seen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Seen, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Seen(true))
    }
}

/// Whether `result` is an object without any member of [`ToolShaped`]. The answer to a request
/// that is neither a call nor a tool list, but which has one, is judged as a tool's output all
/// the same: `tasks/result` carries a task-augmented call's result, and a server that routes
/// answers by id gives a call's answer to a later request with the same id. One that cannot be
/// read so (not an object, a member twice) is judged too.
fn not_tool_shaped(result: &RawValue) -> bool {
    // An object: serde would read `[]` as a struct of defaults too.
    let object = result.get().trim_start().starts_with('{');
    object
        && serde_json::from_str::<ToolShaped>(result.get()).is_ok_and(|r| {
            !(r.content.0 || r.structured.0 || r.is_error.0 || r.tools.0 || r.tool_result.0)
        })
}

/// What becomes of one message from the server.
pub enum Inspected {
    Keep,
    Replace(String),
    /// Unreadable: not shown to the agent (its requests are answered as failed instead).
    Drop,
}

/// One message from the server, judged if it answers a `tools/call` or `tools/list`.
pub fn inspect(tracker: &mut Tracker, active: Option<&Active>, msg: &str) -> Inspected {
    inspect_reply(tracker, active, msg, jsonrpc::classify_reply(msg))
}

/// The data of an event: one message, or a batch of them (as servers of 2025-03-26 may send),
/// each judged.
fn inspect_data(tracker: &mut Tracker, active: Option<&Active>, data: &str) -> Inspected {
    if !data.trim_start().starts_with('[') {
        return inspect(tracker, active, data);
    }
    let Ok(parsed) = jsonrpc::parse_body(data.as_bytes()) else {
        return Inspected::Drop;
    };
    let (out, changed) = inspect_all(tracker, active, &parsed);
    match changed {
        false => Inspected::Keep,
        true => Inspected::Replace(jsonrpc::join(&out, true)),
    }
}

/// Every message of a body, judged: what is passed on, and whether it differs from the body.
fn inspect_all(
    tracker: &mut Tracker,
    active: Option<&Active>,
    parsed: &jsonrpc::Body<'_>,
) -> (Vec<String>, bool) {
    let mut changed = false;
    let mut out: Vec<String> = Vec::with_capacity(parsed.messages.len());
    for msg in &parsed.messages {
        let reply = jsonrpc::classify_reply_message(msg);
        match inspect_reply(tracker, active, msg.get(), reply) {
            Inspected::Keep => out.push(msg.get().to_owned()),
            Inspected::Replace(new) => {
                changed = true;
                out.push(new);
            }
            Inspected::Drop => changed = true,
        }
    }
    (out, changed)
}

/// [`inspect`], `msg` already classified.
fn inspect_reply(
    tracker: &mut Tracker,
    active: Option<&Active>,
    msg: &str,
    reply: Reply<'_>,
) -> Inspected {
    match reply {
        Reply::Result { id, result } => match tracker.take(&jsonrpc::id_key(id)) {
            Some(Pending::Call(call)) => {
                let Some(active) = active else {
                    let output = tracker.capture_mcp_output(None, result.get());
                    tracker.finish(
                        call,
                        Finish {
                            decision: "allowed",
                            error: false,
                            output,
                        },
                    );
                    return Inspected::Keep;
                };
                let is_error = serde_json::from_str::<ResultFlags>(result.get())
                    .map(|f| f.is_error)
                    .unwrap_or(false);
                let upstream = tracker.upstream().to_owned();
                let decided = if call.redacted { "redacted" } else { "allowed" };
                let verdict = call.in_span(|| {
                    check_output(active, tracker, &call.tool, Content::Json(result.get()))
                });
                let set = Some(&active.set);
                let (decision, error, output) = match &verdict {
                    OutputVerdict::Pass => (
                        decided,
                        is_error,
                        tracker.capture_mcp_output(set, result.get()),
                    ),
                    OutputVerdict::Redacted(text) => {
                        ("redacted", is_error, tracker.capture_mcp_output(set, text))
                    }
                    OutputVerdict::Refuse(r) => (
                        "blocked",
                        true,
                        tracker.capture(None, &r.to_string(), false, Checked::Yes),
                    ),
                };
                tracker.finish(
                    call,
                    Finish {
                        decision,
                        error,
                        output,
                    },
                );
                apply(msg, &upstream, verdict)
            }
            Some(Pending::List) => match active {
                Some(active) => tool_list(tracker, active, msg, id, result),
                // Not asked without policies (refused then), so not answered either.
                None => Inspected::Drop,
            },
            Some(Pending::Other) if not_tool_shaped(result) => Inspected::Keep,
            // Asked on the stream the agent resumed: passes as it would have there, unless a
            // client could take it for a call's (whatever ids the agent reused, and when).
            None if not_tool_shaped(result) && tracker.take_resumed(&jsonrpc::id_key(id)) => {
                Inspected::Keep
            }
            Some(Pending::Other) | None => match active {
                Some(active) => unmatched(tracker, active, msg, id, result),
                // Nothing to judge it by: not shown (fail closed).
                None => Inspected::Drop,
            },
        },
        Reply::Error { id, error } => {
            let judged = match active {
                Some(active) => judge_error(tracker, active, msg, id, error),
                // Nothing to judge its text by: answered with why (fail closed).
                None => Inspected::Replace(rescue::request_error(
                    Some(&jsonrpc::id_key(id)),
                    &Refusal::from(FailClosed {
                        reason: "no valid policy set is loaded, so the tool server's error cannot be checked".into(),
                    }),
                )),
            };
            if let Some(Pending::Call(call)) = tracker.take(&jsonrpc::id_key(id)) {
                let decision = if call.redacted { "redacted" } else { "allowed" };
                // Errors are not inspected on their way to the agent, so their text gets the
                // full scan before it is reported.
                let output = tracker.capture(active.map(|a| &a.set), msg, true, Checked::No);
                tracker.finish(
                    call,
                    Finish {
                        decision,
                        error: true,
                        output,
                    },
                );
            }
            judged
        }
        Reply::Other => Inspected::Keep,
        Reply::Invalid => {
            tracing::warn!(upstream = %tracker.upstream(), "dropped an unreadable message from the tool server");
            Inspected::Drop
        }
    }
}

/// The message after the output filter's verdict. Output that cannot be rewritten is never
/// passed on as it was (fail closed).
fn apply(msg: &str, upstream: &str, verdict: OutputVerdict) -> Inspected {
    let rewritten = match verdict {
        OutputVerdict::Pass => return Inspected::Keep,
        OutputVerdict::Redacted(text) => serde_json::from_str(&text)
            .ok()
            .and_then(|value| jsonrpc::with_result(msg, value)),
        OutputVerdict::Refuse(refusal) => jsonrpc::with_result(msg, rescue::tool_result(&refusal)),
    };
    match rewritten {
        Some(m) => Inspected::Replace(m),
        None => {
            let refusal = Refusal::from(UpstreamFailed {
                upstream: upstream.to_owned(),
                reason: "its output could not be redacted".into(),
            });
            match jsonrpc::classify_reply(msg) {
                Reply::Result { id, .. } => {
                    Inspected::Replace(rescue::tool_call_answer(&jsonrpc::id_key(id), &refusal))
                }
                _ => Inspected::Drop,
            }
        }
    }
}

/// An error answer, judged as a tool's output: agents show its text to the model.
fn judge_error(
    tracker: &Tracker,
    active: &Active,
    msg: &str,
    id: &RawValue,
    error: &RawValue,
) -> Inspected {
    let verdict = check_output(active, tracker, "", Content::Json(error.get()));
    let refused = |refusal: &Refusal| {
        Inspected::Replace(rescue::request_error(Some(&jsonrpc::id_key(id)), refusal))
    };
    match verdict {
        OutputVerdict::Pass => Inspected::Keep,
        OutputVerdict::Redacted(text) => {
            let rewritten = serde_json::from_str(&text)
                .ok()
                .and_then(|error| jsonrpc::with_error(msg, error));
            match rewritten {
                Some(m) => Inspected::Replace(m),
                None => refused(&Refusal::from(UpstreamFailed {
                    upstream: tracker.upstream().to_owned(),
                    reason: "its error could not be redacted".into(),
                })),
            }
        }
        OutputVerdict::Refuse(refusal) => refused(&refusal),
    }
}

/// An answer that is not JSON-RPC (an HTTP error of the server's, say): its status and headers
/// are kept, as clients act on them (a session gone, credentials asked for), and its body is
/// judged as clients show it (as text, or as JSON when it reads as JSON); one that cannot be is
/// left out. A redirect is refused: the agent would follow it past the sidecar.
async fn judged_http(
    res: Response<Body>,
    tracker: &Tracker,
    active: Option<&Active>,
    cap: u64,
) -> Response<Body> {
    if res.status().is_redirection() {
        return rescue::http_error(&Refusal::from(UpstreamFailed {
            upstream: tracker.upstream().to_owned(),
            reason: format!(
                "it redirected ({}), which the sidecar does not follow",
                res.status()
            ),
        }));
    }
    let (mut parts, body) = res.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    // A compressed body cannot be judged: left out like any other that cannot be.
    let compressed = content_coding(&parts.headers).is_some();
    parts.headers.remove(header::CONTENT_ENCODING);
    let bytes = read_limited(body, cap, "tool server's response").await.ok();
    let text = bytes
        .as_deref()
        .filter(|_| !compressed)
        .and_then(|b| std::str::from_utf8(b).ok());
    let body = match (text, active) {
        (Some(text), Some(active)) if !text.is_empty() => {
            let json = as_json(text);
            let content = match &json {
                Some(json) => Content::Json(json),
                None => Content::Text(text),
            };
            match check_output(active, tracker, "", content) {
                OutputVerdict::Pass => text.to_owned(),
                // Redacting the copy judged would change its numbers as well.
                OutputVerdict::Redacted(_) if matches!(json, Some(Cow::Owned(_))) => String::new(),
                OutputVerdict::Redacted(redacted) => redacted,
                OutputVerdict::Refuse(refusal) => refusal.to_string(),
            }
        }
        _ => String::new(),
    };
    Response::from_parts(parts, Body::from(body))
}

/// Refuses a request whose id another request of the same body has: their answers could not be
/// told apart, and one could pass for the other's. Says whether it did.
fn same_id(tracker: &Tracker, id: &str, local: &mut Vec<String>) -> bool {
    if !tracker.is_open(id) {
        return false;
    }
    let refusal = Refusal::from(Unjudgeable {
        reason: "another request in the same body has this id".into(),
    });
    local.push(rescue::request_error(Some(id), &refusal));
    true
}

/// A `tools/list` result without the tools the policies forbid; one that cannot be read here
/// is refused, as a client's parser might still read it.
fn tool_list(
    tracker: &Tracker,
    active: &Active,
    msg: &str,
    id: &RawValue,
    result: &RawValue,
) -> Inspected {
    let unreadable = || {
        let refusal = Refusal::from(UpstreamFailed {
            upstream: tracker.upstream().to_owned(),
            reason: "its tool list cannot be read".into(),
        });
        Inspected::Replace(rescue::request_error(Some(&jsonrpc::id_key(id)), &refusal))
    };
    let Ok(mut result) = serde_json::from_str::<serde_json::Value>(result.get()) else {
        return unreadable();
    };
    let Some(tools) = result.get_mut("tools") else {
        return Inspected::Keep;
    };
    let Some(tools) = tools.as_array_mut() else {
        return unreadable();
    };
    hide_forbidden_tools(active, tools);
    judge_tools(active, tracker, tools);
    // Passed on as read and judged, even unchanged: a client could read the text as sent
    // otherwise (the first of two `description` keys, where the sidecar read the last).
    match jsonrpc::with_result(msg, result) {
        Some(m) => Inspected::Replace(m),
        None => unreadable(),
    }
}

/// A result the sidecar did not see the request of (a stream the agent resumed, a GET stream,
/// an id spelled otherwise than the request's, which clients may still match to it): a tool
/// list loses the forbidden tools, and any result is judged as a tool's output, so that
/// nothing a client may take for a tool's answer is shown unjudged.
fn unmatched(
    tracker: &Tracker,
    active: &Active,
    msg: &str,
    id: &RawValue,
    result: &RawValue,
) -> Inspected {
    let listed = tool_list(tracker, active, msg, id, result);
    let (msg, result) = match &listed {
        Inspected::Keep => (msg, result.get().to_owned()),
        Inspected::Replace(new) => match jsonrpc::classify_reply(new) {
            Reply::Result { result, .. } => (new.as_str(), result.get().to_owned()),
            // The tool list could not be read: refused.
            _ => return listed,
        },
        Inspected::Drop => return listed,
    };
    let upstream = tracker.upstream().to_owned();
    let verdict = judge_beside_tools(active, tracker, &upstream, &result);
    match apply(msg, &upstream, verdict) {
        Inspected::Keep => listed,
        judged => judged,
    }
}

/// Judges a result as a tool's output, all but its `tools`, which [`tool_list`] judged one by
/// one already: none is counted twice. A redacted rest gets the tools back.
fn judge_beside_tools(
    active: &Active,
    tracker: &Tracker,
    upstream: &str,
    result: &str,
) -> OutputVerdict {
    type Object = serde_json::Map<String, serde_json::Value>;
    let Ok(mut rest) = serde_json::from_str::<Object>(result) else {
        return check_output(active, tracker, "", Content::Json(result));
    };
    let Some(tools) = rest.remove("tools") else {
        return check_output(active, tracker, "", Content::Json(result));
    };
    let rest = serde_json::Value::Object(rest).to_string();
    match check_output(active, tracker, "", Content::Json(&rest)) {
        OutputVerdict::Redacted(text) => match serde_json::from_str::<Object>(&text) {
            Ok(mut redacted) => {
                redacted.insert("tools".into(), tools);
                OutputVerdict::Redacted(serde_json::Value::Object(redacted).to_string())
            }
            Err(_) => OutputVerdict::Refuse(Refusal::from(UpstreamFailed {
                upstream: upstream.to_owned(),
                reason: "its output could not be redacted".into(),
            })),
        },
        verdict => verdict,
    }
}

/// GET (the server's stream) and DELETE (end of session) pass through; a GET stream is still
/// inspected event by event.
async fn other(shared: &Shared, up: &Upstream, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let active = shared.policies.current().ok();
    let cap = shared.body_cap(active.as_deref());
    let bytes = match read_request(body, cap).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let is_get = parts.method == Method::GET;
    let resuming = parts.headers.contains_key(LAST_EVENT_ID);
    let session = parts.headers.get(MCP_SESSION_ID).cloned();
    let res = match send(shared, up, parts.method, parts.headers, bytes).await {
        Ok(res) => res,
        Err(e) => return rescue::http_error(&e.into()),
    };
    let mut tracker = shared.tracker(up.name.clone());
    if !res.status().is_success() {
        return judged_http(res, &tracker, active.as_deref(), cap).await;
    }
    if !is_get {
        return without_body(res);
    }
    if let Some(session) = session.filter(|_| resuming) {
        tracker.expect_resumed(shared.unanswered.resumable(&up.name, &session));
    }
    if !media_type_is(res.headers(), "text/event-stream") {
        // Some clients parse any successful answer to their GET as an event stream.
        return rescue::http_error(&Refusal::from(UpstreamFailed {
            upstream: up.name.to_string(),
            reason: "it answered the GET with something other than an event stream".into(),
        }));
    }
    event_stream(res, tracker, active, None, Vec::new(), cap, None)
}

struct Stream {
    body: Body,
    parser: sse::Parser,
    tracker: Tracker,
    active: Option<Arc<Active>>,
    deadline: Option<(Instant, Refusal)>,
    queue: VecDeque<Bytes>,
    done: bool,
    resume: Option<Resume>,
    /// Whether the sidecar resumed the stream: then it ends once nothing is open, as the
    /// server's resumed stream may stay open for the session.
    resumed: bool,
}

/// How the sidecar picks up an answer stream that the server ends before its answers, having
/// given an event id: the 2025-11-25 spec's SSE polling, where the client resumes with a GET and
/// `Last-Event-ID`. The sidecar resumes it itself, so that the answers still come on the
/// stream the agent holds, judged, counted and under their deadline as if it had not ended.
struct Resume {
    shared: Arc<Shared>,
    up: Arc<Upstream>,
    uri: Uri,
    /// The request's headers, sent again with the GET (the session id, the protocol version,
    /// credentials).
    headers: HeaderMap,
    /// The last event id the server gave on the stream.
    last_event_id: Option<String>,
    /// How long the server asked clients to wait before they reconnect.
    retry: Duration,
    /// Times resumed since the server last sent a message.
    idle: u32,
}

/// Wait before resuming when the server did not say (as the SDK clients do).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// The shortest wait before resuming, whatever the server says.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// Resumes in a row that bring no message before the sidecar gives up.
const MAX_IDLE_RESUMES: u32 = 3;

impl Resume {
    /// For an MCP server over HTTP; a stdio server never ends an answer early.
    fn new(shared: &Arc<Shared>, up: &Arc<Upstream>, headers: &HeaderMap) -> Option<Resume> {
        let Transport::Mcp(uri) = &up.transport else {
            return None;
        };
        let mut headers = headers.clone();
        for h in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ] {
            headers.remove(h);
        }
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        Some(Resume {
            shared: shared.clone(),
            up: up.clone(),
            uri: uri.clone(),
            headers,
            last_event_id: None,
            retry: DEFAULT_RETRY,
            idle: 0,
        })
    }

    /// Sends the GET with the session id the server gave in its answer (to an `initialize`).
    fn session_from(&mut self, answer: &HeaderMap) {
        if let Some(session) = answer.get(MCP_SESSION_ID) {
            self.headers.insert(MCP_SESSION_ID, session.clone());
        }
    }

    /// The resumed stream's body, or why there is none.
    async fn resume(&mut self) -> Result<Body, String> {
        let ended = "closed the stream before answering";
        let Some(last) = self.last_event_id.as_deref() else {
            return Err(ended.into());
        };
        let Ok(last) = HeaderValue::from_str(last) else {
            return Err(format!(
                "{ended}, after an event id that cannot be sent back"
            ));
        };
        self.idle += 1;
        if self.idle > MAX_IDLE_RESUMES {
            return Err(format!("{ended}, {MAX_IDLE_RESUMES} times in a row"));
        }
        tokio::time::sleep(self.retry).await;
        let mut headers = self.headers.clone();
        headers.insert(LAST_EVENT_ID, last);
        let (client, uri) = (&self.shared.client, self.uri.clone());
        let res = send_http(client, &self.up, Method::GET, uri, headers, Bytes::new())
            .await
            .map_err(|e| format!("{ended}, and resuming it failed: {}", e.reason))?;
        if !res.status().is_success() || !media_type_is(res.headers(), "text/event-stream") {
            return Err(format!("{ended}, and resuming it got {}", res.status()));
        }
        Ok(res.into_body())
    }
}

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// Passes an event stream on event by event, inspecting the answers in it; the sidecar's own
/// answers go first.
fn event_stream(
    res: Response<Body>,
    tracker: Tracker,
    active: Option<Arc<Active>>,
    deadline: Option<(Instant, Refusal)>,
    local: Vec<String>,
    cap: u64,
    resume: Option<Resume>,
) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    // Read as UTF-8 here (as SSE is), so said to be that: a client must not decode it otherwise.
    let sse = HeaderValue::from_static("text/event-stream");
    parts.headers.insert(header::CONTENT_TYPE, sse);
    let queue = local
        .iter()
        .map(|m| Bytes::from(sse::message_event(m)))
        .collect();
    let state = Stream {
        body,
        parser: sse::Parser::new(usize::try_from(cap).unwrap_or(usize::MAX)),
        tracker,
        active,
        deadline,
        queue,
        done: false,
        resume,
        resumed: false,
    };
    let stream = futures_util::stream::unfold(state, next_chunk);
    Response::from_parts(parts, Body::from_stream(stream))
}

enum Step {
    Frame(Option<Result<http_body::Frame<Bytes>, axum::Error>>),
    Deadline,
}

async fn next_chunk(mut st: Stream) -> Option<(Result<Bytes, Infallible>, Stream)> {
    loop {
        if let Some(b) = st.queue.pop_front() {
            return Some((Ok(b), st));
        }
        if st.done {
            return None;
        }
        let deadline = st
            .deadline
            .as_ref()
            .filter(|_| st.tracker.has_calls())
            .map(|(at, _)| *at);
        let step = match deadline {
            // A deadline that has passed wins over an answer that is ready too.
            Some(at) => tokio::select! {
                biased;
                _ = tokio::time::sleep_until(at) => Step::Deadline,
                f = st.body.frame() => Step::Frame(f),
            },
            None => Step::Frame(st.body.frame().await),
        };
        match step {
            Step::Deadline => {
                if let Some((_, refusal)) = st.deadline.take() {
                    st.fail(&refusal);
                }
            }
            Step::Frame(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                match st.parser.push(&data) {
                    Ok(events) => {
                        for event in events {
                            st.event(event);
                        }
                        if st.resumed && !st.tracker.has_pending() {
                            st.done = true;
                        }
                    }
                    Err(sse::EventTooLarge) => {
                        let reason = "sent an event larger than the limit".to_owned();
                        st.fail_upstream(reason);
                    }
                }
            }
            Step::Frame(Some(Err(e))) => st.fail_upstream(format!("the stream broke off: {e}")),
            Step::Frame(None) => {
                // An event the server did not finish is not one to a client: not passed on (a
                // resumed stream's first bytes would otherwise finish it unjudged), nor a point to
                // resume from.
                if st.parser.finish().is_some() {
                    tracing::debug!(upstream = %st.tracker.upstream(), "dropping an event the server did not finish");
                }
                if !st.tracker.has_pending() {
                    st.done = true;
                    continue;
                }
                let deadline = st
                    .deadline
                    .as_ref()
                    .filter(|_| st.tracker.has_calls())
                    .map(|(at, _)| *at);
                let resuming = async {
                    match st.resume.as_mut() {
                        Some(r) => r.resume().await,
                        None => Err("closed the stream before answering".into()),
                    }
                };
                let resumed = match deadline {
                    Some(at) => tokio::select! {
                        biased;
                        _ = tokio::time::sleep_until(at) => None,
                        r = resuming => Some(r),
                    },
                    None => Some(resuming.await),
                };
                match resumed {
                    Some(Ok(body)) => {
                        st.body = body;
                        st.resumed = true;
                    }
                    Some(Err(reason)) => st.fail_upstream(reason),
                    None => {
                        if let Some((_, refusal)) = st.deadline.take() {
                            st.fail(&refusal);
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Stream {
    /// A stream dropped with requests open was cut on the agent's side (a failure answers them
    /// all): the agent may resume it, and get their answers there.
    fn drop(&mut self) {
        let Some(resume) = &self.resume else { return };
        if let Some(session) = resume.headers.get(MCP_SESSION_ID) {
            let open = self.tracker.open_requests();
            resume
                .shared
                .unanswered
                .keep(&resume.up.name, session, open);
        }
    }
}

impl Stream {
    fn event(&mut self, event: sse::Event) {
        if let Some(r) = self.resume.as_mut() {
            if let Some(id) = event.id() {
                // An empty id means nowhere to resume from.
                r.last_event_id = (!id.is_empty()).then(|| id.to_owned());
            }
            if let Some(ms) = event.retry() {
                r.retry = Duration::from_millis(ms).max(MIN_RETRY);
            }
        }
        if !event.is_message() {
            // Clients take only message events: the data of others is neither judged (it must
            // not stand for an answer a client would never read) nor passed on; their id is,
            // as a client records it to resume from.
            self.queue.push_back(event.rebuilt(None).into());
            return;
        }
        let data = event.data();
        let inspected = match &data {
            Some(data) if !data.trim().is_empty() => {
                if let Some(r) = self.resume.as_mut() {
                    r.idle = 0;
                }
                inspect_data(&mut self.tracker, self.active.as_deref(), data)
            }
            // Data that is not UTF-8 cannot be inspected, so it is not passed on.
            None if event.has_data() => Inspected::Drop,
            _ => Inspected::Keep,
        };
        match inspected {
            Inspected::Keep => self.queue.push_back(event.rebuilt(data.as_deref()).into()),
            Inspected::Replace(new) => self.queue.push_back(event.rebuilt(Some(&new)).into()),
            Inspected::Drop => {}
        }
    }

    fn fail_upstream(&mut self, reason: String) {
        let refusal = Refusal::from(UpstreamFailed {
            upstream: self.tracker.upstream().to_owned(),
            reason,
        });
        self.fail(&refusal);
    }

    /// Answers what is still open and ends the stream.
    fn fail(&mut self, refusal: &Refusal) {
        tracing::warn!(upstream = %self.tracker.upstream(), error = %refusal, "event stream failed");
        for answer in self.tracker.fail_all(refusal) {
            self.queue
                .push_back(Bytes::from(sse::message_event(&answer)));
        }
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_a_client_could_take_for_a_tools_is_tool_shaped() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert!(not_tool_shaped(&raw(
            r#"{"contents":[{"uri":"a","text":"b"}]}"#
        )));
        assert!(not_tool_shaped(&raw(
            r#"{"messages":[],"description":"p"}"#
        )));
        for shaped in [
            r#"{"content":[]}"#,
            r#"{"content":null}"#,
            r#"{"structuredContent":{}}"#,
            r#"{"isError":false,"contents":[]}"#,
            r#"{"tools":[]}"#,
            r#"{"toolResult":1}"#,
            r#"{"\u0063ontent":[]}"#,
            r#"[]"#,
            r#""text""#,
        ] {
            assert!(!not_tool_shaped(&raw(shaped)), "{shaped}");
        }
    }
}

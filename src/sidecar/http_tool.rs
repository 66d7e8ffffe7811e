//! Plain HTTP tools at `/tools/{name}/...`: the request body (and query) is judged as the
//! call's arguments, the response body as its output. A refusal is an HTTP error with a JSON
//! body: 403 for a policy, 504 for the deadline, 413 for a request body over the cap, 502 for a
//! tool that fails (a response over the cap included).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use perfecx_policy::{Content, Enforcement, Limit};

use super::Shared;
use super::calls::{Finish, Tracker};
use super::denial::{
    DeadlineExceeded, FailClosed, Refusal, SlowClient, TooLarge, Unjudgeable, UpstreamFailed,
};
use super::events::Checked;
use super::mcp::CLIENT_BODY_TIMEOUT;
use super::output_filter::{OutputVerdict, check_output};
use super::policies::Active;
use super::policy_check::{CallVerdict, check_call};
use super::pool::ExchangeError;
use super::rescue;
use super::upstream::{
    ReadError, Transport, Upstream, as_json, media_type_is, outgoing_headers, read_limited,
    refuse_compressed, refuse_compressed_request, strip_hop_by_hop,
};

/// Answers a call of the plain HTTP tool `up`.
pub async fn handle<B>(shared: Arc<Shared>, up: Arc<Upstream>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tool: &str = &up.name;
    let tracker = shared.tracker(up.name.clone());
    let span = tracker.span(tool);
    let active = match shared.policies.current() {
        Ok(a) => a,
        Err(no) => {
            let refusal = Refusal::from(FailClosed { reason: no.reason });
            tracker.refused(tool, &refusal, span);
            return rescue::http_error(&refusal);
        }
    };
    let cap = shared.body_cap(Some(&active));
    let (parts, body) = req.into_parts();
    if let Err(compressed) = refuse_compressed_request(&parts.headers) {
        let refusal = Refusal::from(compressed);
        tracker.refused(tool, &refusal, span);
        return rescue::http_error(&refusal);
    }
    let bytes = read_body(&parts.headers, body, cap, CLIENT_BODY_TIMEOUT).await;
    // A call that cannot be read is refused, logged and counted like any other.
    let bytes = match bytes {
        Ok(b) => b,
        Err(refusal) => {
            tracker.refused(tool, &refusal, span);
            return rescue::http_error(&refusal);
        }
    };

    // Judge the body, then the path and query: all of them carry arguments.
    let rest = super::raw_rest(parts.uri.path());
    if has_dot_segment(rest) {
        let refusal = Refusal::from(Unjudgeable {
            reason: "the path has a `.` or `..` segment, by which it could reach past the tool"
                .into(),
        });
        tracker.refused(tool, &refusal, span);
        return rescue::http_error(&refusal);
    }
    let query = parts.uri.query();
    let judged =
        span.in_scope(|| judge(&tracker, &active, tool, &parts.headers, bytes, rest, query));
    let body = match judged {
        Ok(judged) => judged,
        Err(refusal) => {
            tracker.refused(tool, &refusal, span);
            return rescue::http_error(&refusal);
        }
    };
    let redacted = body.1;

    let base = match &up.transport {
        Transport::Http(base) => Some(base),
        Transport::Mcp(_) | Transport::Stdio(_) => None,
    };
    let target = base
        .and_then(|base| target(base, rest, query))
        .zip(up.pool.as_ref());
    let (uri, pool) = match target {
        Some(t) => t,
        None => {
            let refusal = Refusal::from(Unjudgeable {
                reason: "the path cannot be forwarded".into(),
            });
            tracker.refused(tool, &refusal, span);
            return rescue::http_error(&refusal);
        }
    };
    let mut tracker = tracker;
    tracker.alert_after(&active);
    let input = if tracker.reporting() {
        let text = input_text(&parts.method, rest, query, &body.0);
        tracker.capture(Some(&active.set), &text, false, Checked::Yes)
    } else {
        None
    };
    tracker.start_call(String::new(), tool, redacted, span, input);
    let deadline = deadline(&active);
    let mut headers = parts.headers;
    outgoing_headers(&up, &mut headers);
    let mut request = Request::new(body.0);
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let call = async {
        match pool.exchange(request, cap).await {
            Ok((mut parts, b)) => {
                strip_hop_by_hop(&mut parts.headers);
                refuse_compressed(tool, &parts.headers, !b.is_empty())?;
                Ok((parts, b))
            }
            Err(ExchangeError::Send(reason)) => Err(Refusal::from(UpstreamFailed {
                upstream: tool.to_owned(),
                reason,
            })),
            // The tool failed, not the agent's request: a 502, not a 413.
            Err(ExchangeError::Body(ReadError::TooLarge(t))) => {
                Err(Refusal::from(UpstreamFailed {
                    upstream: tool.to_owned(),
                    reason: format!("its response is larger than the limit of {} bytes", t.limit),
                }))
            }
            Err(ExchangeError::Body(ReadError::Failed(m))) => Err(Refusal::from(UpstreamFailed {
                upstream: tool.to_owned(),
                reason: format!("the response broke off: {m}"),
            })),
        }
    };
    let result: Result<_, Refusal> = match deadline {
        Some(limit) => {
            match tokio::time::timeout(std::time::Duration::from_millis(limit.value), call).await {
                Ok(r) => r,
                Err(_) => Err(Refusal::from(DeadlineExceeded {
                    limit_ms: limit.value,
                    policy: limit.policy.clone(),
                })),
            }
        }
        None => call.await,
    };
    let (mut parts, bytes) = match result {
        Ok(r) => r,
        Err(refusal) => {
            tracing::warn!(upstream = %tool, error = %refusal, "plain HTTP tool call failed");
            tracker.fail_all(&refusal);
            return rescue::http_error(&refusal);
        }
    };
    let call = match tracker.take("") {
        Some(super::calls::Pending::Call(c)) => c,
        _ => {
            return rescue::http_error(&Refusal::from(UpstreamFailed {
                upstream: tool.to_owned(),
                reason: "lost track of the call".into(),
            }));
        }
    };
    let error = parts.status.is_client_error() || parts.status.is_server_error();
    let decided = if redacted { "redacted" } else { "allowed" };

    // Inspect the output. A redirect is not passed on: the agent would follow it past the
    // sidecar (a 304 names nothing to follow).
    let text = if parts.status.is_redirection() && parts.status != StatusCode::NOT_MODIFIED {
        Err(format!(
            "it redirected ({}), which the sidecar does not follow",
            parts.status
        ))
    } else {
        std::str::from_utf8(&bytes)
            .map_err(|_| "its response is not UTF-8 text, so it cannot be inspected".to_owned())
    };
    let text = match text {
        Ok(text) => text,
        Err(reason) => {
            let refusal = Refusal::from(UpstreamFailed {
                upstream: tool.to_owned(),
                reason,
            });
            let output = tracker.capture(None, &refusal.to_string(), false, Checked::Yes);
            tracker.finish(
                call,
                Finish {
                    decision: decided,
                    error: true,
                    output,
                },
            );
            return rescue::http_error(&refusal);
        }
    };
    // An empty output (a HEAD, a 204) has nothing to judge: as text, not as JSON that
    // cannot be parsed.
    let labelled = media_type_is(&parts.headers, "application/json");
    let mut json = json_of(labelled, text);
    let judge = |json: &Option<Cow<'_, str>>| {
        let content = match json {
            Some(json) => Content::Json(json),
            None => Content::Text(text),
        };
        call.in_span(|| check_output(&active, &tracker, tool, content))
    };
    let mut verdict = judge(&json);
    // Labelled JSON the engine cannot read may be JSON as lenient readers take it (after a
    // byte-order mark, with NaN): read so then, and only then, off the usual path.
    if json.is_some()
        && labelled
        && matches!(verdict, OutputVerdict::Refuse(Refusal::Upstream(_)))
        && let Some(lenient) = as_json(text)
    {
        json = Some(lenient);
        verdict = judge(&json);
    }
    if let (OutputVerdict::Redacted(_), Some(Cow::Owned(_))) = (&verdict, &json) {
        // Redacting the copy would change its numbers as well.
        verdict = OutputVerdict::Refuse(Refusal::from(UpstreamFailed {
            upstream: tool.to_owned(),
            reason: "its output needs redacting but is not strict JSON (NaN or Infinity), so it cannot be redacted".into(),
        }));
    }
    let json = json.is_some();
    let set = Some(&active.set);
    match verdict {
        OutputVerdict::Pass => {
            let output = tracker.capture(set, text, json, Checked::Yes);
            tracker.finish(
                call,
                Finish {
                    decision: decided,
                    error,
                    output,
                },
            );
            Response::from_parts(parts, Body::from(bytes))
        }
        OutputVerdict::Redacted(new) => {
            let output = tracker.capture(set, &new, json, Checked::Yes);
            tracker.finish(
                call,
                Finish {
                    decision: "redacted",
                    error,
                    output,
                },
            );
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(new))
        }
        OutputVerdict::Refuse(refusal) => {
            let output = tracker.capture(None, &refusal.to_string(), false, Checked::Yes);
            tracker.finish(
                call,
                Finish {
                    decision: "blocked",
                    error: true,
                    output,
                },
            );
            rescue::http_error(&refusal)
        }
    }
}

/// The agent's body, read whole within `wait`, up to `cap` bytes.
async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    cap: u64,
    wait: Duration,
) -> Result<Bytes, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A body declared larger than the cap is refused before it is read, so that a client
    // waiting for `100 Continue` is refused without uploading it.
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap) {
        return Err(TooLarge {
            limit: cap,
            what: "request body",
        }
        .into());
    }
    match tokio::time::timeout(wait, read_limited(body, cap, "request body")).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(ReadError::TooLarge(t))) => Err(t.into()),
        Ok(Err(ReadError::Failed(m))) => Err(Unjudgeable {
            reason: format!("cannot read the body: {m}"),
        }
        .into()),
        Err(_) => Err(SlowClient { waited: wait }.into()),
    }
}

/// A plain HTTP call's arguments as one text for its event: the request line, then the body.
fn input_text(method: &http::Method, rest: &str, query: Option<&str>, body: &[u8]) -> String {
    let path = if rest.is_empty() { "/" } else { rest };
    let mut text = match query {
        Some(q) => format!("{method} {path}?{q}"),
        None => format!("{method} {path}"),
    };
    // The body was checked to be UTF-8 when it was judged.
    let body = String::from_utf8_lossy(body);
    if !body.is_empty() {
        text.push('\n');
        text.push_str(&body);
    }
    text
}

/// The body to forward (redacted if need be), and whether it was redacted.
fn judge(
    tracker: &Tracker,
    active: &Active,
    tool: &str,
    headers: &HeaderMap,
    body: Bytes,
    path: &str,
    query: Option<&str>,
) -> Result<(Bytes, bool), Refusal> {
    let text = std::str::from_utf8(&body).map_err(|e| Unjudgeable {
        reason: format!("the body is not valid UTF-8 (at byte {})", e.valid_up_to()),
    })?;
    let form = media_type_is(headers, "application/x-www-form-urlencoded");
    let labelled = media_type_is(headers, "application/json");
    let mut json = json_of(labelled, text);
    let mut verdict = match (form, &json) {
        (true, _) => check_call(active, tracker, tool, Content::Text(&as_form_reads(text))),
        (false, Some(json)) => check_call(active, tracker, tool, Content::Json(json)),
        (false, None) => check_call(active, tracker, tool, Content::Text(text)),
    };
    // Labelled JSON the engine cannot read may be JSON as lenient readers take it (after a
    // byte-order mark, with NaN): read so then, and only then, off the usual path.
    if json.is_some()
        && labelled
        && matches!(verdict, CallVerdict::Refuse(Refusal::Unjudgeable(_)))
        && let Some(lenient) = as_json(text)
    {
        verdict = check_call(active, tracker, tool, Content::Json(&lenient));
        json = Some(lenient);
    }
    // A form body that reads as JSON is judged as JSON too: tools parse JSON whatever the label.
    if form
        && matches!(verdict, CallVerdict::Forward)
        && let Some(json) = &json
    {
        verdict = check_call(active, tracker, tool, Content::Json(json));
    }
    let body = match verdict {
        CallVerdict::Forward => (body, false),
        // Redacting the copy judged would change its numbers as well.
        CallVerdict::ForwardRedacted(_) if matches!(json, Some(Cow::Owned(_))) => {
            return Err(Unjudgeable {
                reason: "the body carries sensitive data but is not strict JSON (NaN or Infinity), so it cannot be redacted; send it as strict JSON".into(),
            }
            .into());
        }
        // Its values are encoded: a redaction in place would not be one.
        CallVerdict::ForwardRedacted(_) if form => {
            return Err(Unjudgeable {
                reason: "the form body carries sensitive data; send it as JSON instead".into(),
            }
            .into());
        }
        CallVerdict::ForwardRedacted(new) => (Bytes::from(new), true),
        CallVerdict::Refuse(r) => return Err(r),
    };
    let url = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    if !url.is_empty() {
        match check_call(active, tracker, tool, Content::Text(&as_form_reads(&url))) {
            CallVerdict::Forward => {}
            // A URL cannot be redacted without changing what it names.
            CallVerdict::ForwardRedacted(_) => {
                return Err(Unjudgeable {
                    reason: "the URL carries sensitive data; send it in the body instead".into(),
                }
                .into());
            }
            CallVerdict::Refuse(r) => return Err(r),
        }
    }
    Ok(body)
}

/// A query string or form body as the tool will read it, for judging: `+` stands for a space
/// there (the engine resolves `%XX` escapes itself).
fn as_form_reads(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('+') {
        std::borrow::Cow::Owned(text.replace('+', " "))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The JSON a body is judged as: its text when it is labelled JSON (read leniently only when
/// the engine cannot read it, off the usual path), or what it reads as under another label;
/// `None` for text, and for an empty body, which has nothing to judge.
fn json_of(labelled: bool, text: &str) -> Option<Cow<'_, str>> {
    if labelled {
        Some(Cow::Borrowed(text))
    } else {
        as_json(text)
    }
    .filter(|json| !json.trim().is_empty())
}

/// Whether `rest` has a `.` or `..` segment, as written or once its `%2E`, `%2F`, `%5C` and
/// `%3B` escapes are read, with `\` for a separator as well and `;` ending a segment: a server
/// or gateway behind the tool that resolves them would take the request out of the tool's path,
/// to another tool.
fn has_dot_segment(rest: &str) -> bool {
    // Most paths have neither: no copy for them, on every call.
    if !rest.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    let mut decoded = String::with_capacity(rest.len());
    let mut rest = rest;
    while let Some(i) = rest.find('%') {
        decoded.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3).unwrap_or("");
        match escape.to_ascii_lowercase().as_str() {
            "%2e" => decoded.push('.'),
            "%2f" | "%5c" => decoded.push('/'),
            "%3b" => decoded.push(';'),
            _ => {
                decoded.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    decoded.push_str(rest);
    // `..;x` too: servlet containers read the part before a `;` as the segment.
    decoded
        .split(['/', '\\'])
        .map(|segment| segment.split(';').next().unwrap_or(segment))
        .any(|segment| segment == "." || segment == "..")
}

/// The tool's URL for `rest` (the path after `/tools/{name}`) and `query`, in origin form (what
/// goes on the request line: the connection is to the tool already).
fn target(base: &Uri, rest: &str, query: Option<&str>) -> Option<Uri> {
    let base_path = base.path().trim_end_matches('/');
    let mut pq = String::with_capacity(base_path.len() + rest.len() + 2);
    pq.push_str(base_path);
    if !rest.starts_with('/') {
        pq.push('/');
    }
    pq.push_str(rest);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    base.scheme()?;
    base.authority()?;
    Uri::builder().path_and_query(pq).build().ok()
}

/// A strict `max_execution_time_ms`: calls that take longer are cut off.
fn deadline(active: &Active) -> Option<&Limit> {
    let limit = active.set.limits().max_execution_time_ms.as_ref()?;
    (limit.enforcement == Enforcement::Strict).then_some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_however_written() {
        for rest in [
            "/..",
            "/../shell/run",
            "/a/./b",
            "/%2e%2E/shell",
            "/.%2e/shell",
            "/a%2F..%2Fshell",
            "/a%5c..%5cshell",
            "/a\\..\\shell",
            "/..;/shell",
            "/.;x/shell",
            "/..%3Bx/shell",
        ] {
            assert!(has_dot_segment(rest), "{rest}");
        }
        for rest in [
            "",
            "/",
            "/search",
            "/a.b/..c/c..",
            "/%2e%2e%2e",
            "/%",
            "/%2",
            "/50%25",
        ] {
            assert!(!has_dot_segment(rest), "{rest}");
        }
    }

    #[test]
    fn joins_base_path_rest_and_query() {
        let base: Uri = "http://127.0.0.1:8081/api/".parse().unwrap();
        assert_eq!(
            target(&base, "/search", Some("q=x")).unwrap().to_string(),
            "/api/search?q=x"
        );
        let base: Uri = "http://127.0.0.1:8081".parse().unwrap();
        assert_eq!(target(&base, "", None).unwrap().to_string(), "/");
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_refused_with_408() {
        use std::convert::Infallible;

        use http_body::Frame;
        use http_body_util::{BodyExt, StreamBody};

        let never = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let wait = Duration::from_millis(50);
        let refusal = read_body(&HeaderMap::new(), never, 1024, wait)
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::SlowClient(_)), "{refusal}");

        let res = rescue::http_error(&refusal);
        assert_eq!(res.status(), http::StatusCode::REQUEST_TIMEOUT);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout");
        assert_eq!(
            body["error"]["message"],
            "Refused by the perfecx sidecar: the request body did not arrive within 50ms"
        );
    }

    #[tokio::test]
    async fn a_body_declared_too_large_is_refused_before_it_is_read() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, "2048".parse().unwrap());
        // Were this body read, the call would wait out its 10 s and fail as too slow.
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        let refusal = read_body(&headers, body, 1024, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::TooLarge(_)), "{refusal}");
    }
}

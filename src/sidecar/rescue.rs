//! The one place where refusals become answers: an MCP `CallToolResult` with `isError: true`,
//! a JSON-RPC error, or an HTTP response with a JSON error body.

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::Value;

use super::denial::Refusal;
use super::jsonrpc;

/// The `CallToolResult` that answers a refused `tools/call`.
pub fn tool_result(refusal: &Refusal) -> Value {
    serde_json::json!({
        "content": [{ "type": "text", "text": refusal.to_string() }],
        "isError": true,
    })
}

/// A whole JSON-RPC response to a refused `tools/call`.
pub fn tool_call_answer(id: &str, refusal: &Refusal) -> String {
    jsonrpc::result_message(id, &tool_result(refusal))
}

/// A JSON-RPC error answering any other request.
pub fn request_error(id: Option<&str>, refusal: &Refusal) -> String {
    let code = match refusal {
        Refusal::Unjudgeable(_) => jsonrpc::INVALID_PARAMS,
        Refusal::SlowClient(_) | Refusal::Compressed(_) | Refusal::ForeignHost(_) => {
            jsonrpc::INVALID_REQUEST
        }
        _ => jsonrpc::INTERNAL_ERROR,
    };
    jsonrpc::error_message(id, code, &refusal.to_string())
}

/// The HTTP status for a refusal of a plain HTTP tool call or a whole MCP request.
pub fn status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::Policy(p) if p.output => StatusCode::BAD_GATEWAY,
        Refusal::Policy(_) => StatusCode::FORBIDDEN,
        Refusal::FailClosed(_) => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Unjudgeable(_) => StatusCode::BAD_REQUEST,
        Refusal::SlowClient(_) => StatusCode::REQUEST_TIMEOUT,
        Refusal::Compressed(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Refusal::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
        Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
        Refusal::ForeignHost(_) => StatusCode::FORBIDDEN,
    }
}

fn code(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Policy(p) if p.output => "output_blocked",
        Refusal::Policy(_) => "policy_violation",
        Refusal::FailClosed(_) => "no_policy",
        Refusal::Unjudgeable(_) => "bad_request",
        Refusal::SlowClient(_) => "request_timeout",
        Refusal::Compressed(_) => "unsupported_encoding",
        Refusal::Deadline(_) => "deadline_exceeded",
        Refusal::TooLarge(_) => "payload_too_large",
        Refusal::Upstream(_) => "upstream_failed",
        Refusal::ForeignHost(_) => "forbidden_host",
    }
}

/// `{"error": {"code", "message", "policy"?, "rule"?}}` with the refusal's status.
pub fn http_error(refusal: &Refusal) -> Response<Body> {
    let mut error = serde_json::json!({ "code": code(refusal), "message": refusal.to_string() });
    if let Refusal::Policy(p) = refusal {
        error["policy"] = Value::String(p.policy.clone());
        error["rule"] = Value::String(p.rule.to_owned());
    }
    with_headers(
        refusal,
        json_response(
            status(refusal),
            serde_json::json!({ "error": error }).to_string(),
        ),
    )
}

/// A whole MCP request refused: a JSON-RPC error without an id, with the refusal's status.
pub fn rpc_http_error(refusal: &Refusal) -> Response<Body> {
    with_headers(
        refusal,
        json_response(status(refusal), request_error(None, refusal)),
    )
}

/// The headers a refusal's status calls for: what content codings are accepted, for a 415
/// (RFC 9110, 15.5.16).
fn with_headers(refusal: &Refusal, mut res: Response<Body>) -> Response<Body> {
    if let Refusal::Compressed(_) = refusal {
        res.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    res
}

/// A JSON-RPC message (or batch) as an HTTP response.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::denial::PolicyDenied;

    #[test]
    fn a_blocked_call_names_policy_and_rule() {
        let r = Refusal::from(PolicyDenied {
            policy: "safety".into(),
            rule: "tool_restriction",
            detail: "tool `shell` is forbidden".into(),
            output: false,
        });
        let answer: Value = serde_json::from_str(&tool_call_answer("7", &r)).unwrap();
        assert_eq!(answer["id"], 7);
        assert_eq!(answer["result"]["isError"], true);
        let text = answer["result"]["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("`safety`") && text.contains("tool_restriction"),
            "{text}"
        );
        assert_eq!(http_error(&r).status(), StatusCode::FORBIDDEN);
    }
}

//! JSON-RPC messages, parsed once into the few typed facts that later steps read: is this a
//! `tools/call` (of which tool, with which arguments), a `tools/list`, a response, or anything
//! else (which passes through untouched, byte for byte).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The JSON-RPC error codes the sidecar answers with.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// A body: one message or a batch, each kept as its raw text.
pub struct Body<'a> {
    pub batch: bool,
    pub messages: Vec<Message<'a>>,
}

/// One message of a body: its raw JSON text, and its envelope when reading the body already
/// read it (a lone message), so that it is not parsed twice.
pub struct Message<'a> {
    raw: &'a str,
    envelope: Option<Envelope<'a>>,
}

impl<'a> Message<'a> {
    /// The message's JSON text, without surrounding whitespace.
    pub fn get(&self) -> &'a str {
        self.raw
    }
}

/// Why a body is not JSON-RPC.
#[derive(Debug)]
pub struct Malformed(pub String);

pub fn parse_body(bytes: &[u8]) -> Result<Body<'_>, Malformed> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Malformed(format!(
            "the body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let messages: Vec<&RawValue> = serde_json::from_str(text)
            .map_err(|e| Malformed(format!("the body is not valid JSON: {e}")))?;
        if messages.is_empty() {
            return Err(Malformed("an empty batch".into()));
        }
        Ok(Body {
            batch: true,
            messages: messages
                .into_iter()
                .map(|m| Message {
                    raw: m.get(),
                    envelope: None,
                })
                .collect(),
        })
    } else {
        // Reading the envelope reads (and validates) the whole text: a readable envelope is
        // a valid JSON object, and the message is the text without JSON whitespace around it,
        // exactly what a `RawValue` would hold. Anything else takes the general path, which
        // tells a body that is not JSON from a message that is not readable.
        if let Ok(envelope) = serde_json::from_str::<Envelope<'_>>(text) {
            return Ok(Body {
                batch: false,
                messages: vec![Message {
                    raw: text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r')),
                    envelope: Some(envelope),
                }],
            });
        }
        let message: &RawValue = serde_json::from_str(text)
            .map_err(|e| Malformed(format!("the body is not valid JSON: {e}")))?;
        Ok(Body {
            batch: false,
            messages: vec![Message {
                raw: message.get(),
                envelope: None,
            }],
        })
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    jsonrpc: Option<std::borrow::Cow<'a, str>>,
    /// `Some` whenever the member is there, `null` included: a request with a null id is still
    /// a request to some servers, and must not pass for a notification.
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct CallParams<'a> {
    name: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
}

/// What a message from the agent is, as far as the sidecar cares.
pub enum Request<'a> {
    ToolCall {
        id: &'a RawValue,
        tool: std::borrow::Cow<'a, str>,
        /// The raw JSON of `arguments` (`{}` when absent).
        arguments: &'a str,
    },
    ToolsList {
        id: &'a RawValue,
    },
    /// A `tools/call` whose params cannot be read: refused, never forwarded unjudged. Without
    /// an id (a notification) it is dropped.
    BadToolCall {
        id: Option<&'a RawValue>,
        reason: String,
    },
    /// Not a JSON-RPC message the sidecar can read (not an object, a duplicate key, a method
    /// that is not a string): refused, since the tool's parser might read it differently.
    Invalid {
        reason: String,
    },
    /// Another request (with an id), to pass through.
    OtherRequest {
        id: &'a RawValue,
    },
    /// A notification, a response to the server, or something that is not JSON-RPC at all:
    /// passed through for the server to judge.
    Other,
}

pub fn classify(message: &RawValue) -> Request<'_> {
    classify_text(message.get(), None)
}

/// [`classify`] for a message of a body.
pub fn classify_message<'a>(message: &Message<'a>) -> Request<'a> {
    classify_text(message.raw, message.envelope.as_ref())
}

fn classify_text<'a>(message: &'a str, envelope: Option<&Envelope<'a>>) -> Request<'a> {
    let parsed;
    let env = match envelope {
        Some(env) => env,
        None => match serde_json::from_str::<Envelope<'_>>(message) {
            Ok(env) => {
                parsed = env;
                &parsed
            }
            Err(e) => {
                return Request::Invalid {
                    reason: format!("not a readable JSON-RPC message: {e}"),
                };
            }
        },
    };
    let Some(method) = env.method.as_deref() else {
        return Request::Other;
    };
    let Some(id) = env.id else {
        if method == "tools/call" {
            return Request::BadToolCall {
                id: None,
                reason: "a tools/call without an id".into(),
            };
        }
        return Request::Other;
    };
    // MCP ids are strings or numbers. Any other would be matched to its answer by rules of
    // each client's own, and a null one makes a request look like a notification.
    if !matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) {
        return Request::Invalid {
            reason: format!(
                "the id of a request must be a string or a number, not `{}`",
                id.get()
            ),
        };
    }
    match method {
        "tools/call" => {
            let params = env.params.map(RawValue::get).unwrap_or("null");
            match serde_json::from_str::<CallParams<'_>>(params) {
                Ok(p) => Request::ToolCall {
                    id,
                    tool: p.name,
                    arguments: p.arguments.map(RawValue::get).unwrap_or("{}"),
                },
                Err(e) => Request::BadToolCall {
                    id: Some(id),
                    reason: format!("the params of tools/call are invalid: {e}"),
                },
            }
        }
        "tools/list" => Request::ToolsList { id },
        _ => Request::OtherRequest { id },
    }
}

/// A message from the server: a response (to the request with `id`), or anything else.
pub enum Reply<'a> {
    Result {
        id: &'a RawValue,
        result: &'a RawValue,
    },
    Error {
        id: &'a RawValue,
        error: &'a RawValue,
    },
    /// A notification or a request from the server.
    Other,
    /// Not readable (a duplicate key, not an object): never shown to the agent, since its
    /// parser might read it differently than the sidecar would.
    Invalid,
}

pub fn classify_reply(message: &str) -> Reply<'_> {
    // An object only: the envelope would also be read from an array, field by field.
    if !message.trim_start().starts_with('{') {
        return Reply::Invalid;
    }
    match serde_json::from_str::<Envelope<'_>>(message) {
        Ok(env) => reply(&env),
        Err(_) => Reply::Invalid,
    }
}

/// [`classify_reply`] for a message of a body.
pub fn classify_reply_message<'a>(message: &Message<'a>) -> Reply<'a> {
    match &message.envelope {
        Some(env) => reply(env),
        None => classify_reply(message.raw),
    }
}

fn reply<'a>(env: &Envelope<'a>) -> Reply<'a> {
    // Clients take no answer without it: such a one must not stand for the real answer.
    let answer = env.jsonrpc.as_deref() == Some("2.0");
    match (env.id, env.method.as_ref(), env.result, env.error) {
        (Some(_), None, Some(_), _) | (Some(_), None, None, Some(_)) if !answer => Reply::Invalid,
        // Both: clients differ on which one they read, and only one would be judged.
        (_, None, Some(_), Some(_)) => Reply::Invalid,
        (Some(id), None, Some(result), _) => Reply::Result { id, result },
        (Some(id), None, None, Some(error)) => Reply::Error { id, error },
        _ => Reply::Other,
    }
}

/// A key for matching a response to its request: the id's JSON text without surrounding
/// whitespace (`1` and `"1"` stay distinct, as JSON-RPC wants), a whole number's zero fraction
/// left out (`4.0` is the `4` clients match it with). It is valid JSON, so answers can embed it
/// as the id. A result whose id is spelled otherwise still reaches no client unjudged: it is
/// judged as a result the sidecar did not see the request of.
pub fn id_key(id: &RawValue) -> String {
    let text = id.get().trim();
    if let Some((whole, fraction)) = text.split_once('.') {
        let whole_digits = whole.strip_prefix('-').unwrap_or(whole);
        if !whole_digits.is_empty()
            && whole_digits.bytes().all(|b| b.is_ascii_digit())
            && !fraction.is_empty()
            && fraction.bytes().all(|b| b == b'0')
        {
            return whole.to_owned();
        }
    }
    text.to_owned()
}

/// `{"jsonrpc":"2.0","id":id,"result":result}`
pub fn result_message(id: &str, result: &Value) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

/// `{"jsonrpc":"2.0","id":id,"error":{"code":..,"message":..}}`; a null id when unknown.
pub fn error_message(id: Option<&str>, code: i64, message: &str) -> String {
    let error = serde_json::json!({ "code": code, "message": message });
    format!(
        r#"{{"jsonrpc":"2.0","id":{},"error":{}}}"#,
        id.unwrap_or("null"),
        error
    )
}

/// `message` with its `params.arguments` replaced by `arguments` (JSON text).
pub fn with_arguments(message: &str, arguments: &str) -> Option<String> {
    let mut msg: Map<String, Value> = serde_json::from_str(message).ok()?;
    let args: Value = serde_json::from_str(arguments).ok()?;
    let params = msg.get_mut("params")?.as_object_mut()?;
    params.insert("arguments".into(), args);
    serde_json::to_string(&msg).ok()
}

/// `message` (a response) with its `result` replaced.
pub fn with_result(message: &str, result: Value) -> Option<String> {
    let mut msg: Map<String, Value> = serde_json::from_str(message).ok()?;
    msg.insert("result".into(), result);
    serde_json::to_string(&msg).ok()
}

/// `message` with its `error` replaced.
pub fn with_error(message: &str, error: Value) -> Option<String> {
    let mut msg: Map<String, Value> = serde_json::from_str(message).ok()?;
    msg.insert("error".into(), error);
    serde_json::to_string(&msg).ok()
}

/// Joins messages back into a body: the lone message, or a batch.
pub fn join(messages: &[String], batch: bool) -> String {
    if !batch && messages.len() == 1 {
        return messages[0].clone();
    }
    let mut out = String::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_calls_lists_and_the_rest() {
        let body = parse_body(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"calc","arguments":{"a":1}}},
                {"jsonrpc":"2.0","id":"x","method":"tools/list"},
                {"jsonrpc":"2.0","method":"notifications/initialized"},
                {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"arguments":{}}},
                {"jsonrpc":"2.0","id":3,"method":"ping"}]"#,
        )
        .unwrap();
        assert!(body.batch);
        let kinds: Vec<Request<'_>> = body.messages.iter().map(classify_message).collect();
        assert!(
            matches!(&kinds[0], Request::ToolCall { tool, arguments, .. } if tool == "calc" && *arguments == r#"{"a":1}"#)
        );
        assert!(matches!(&kinds[1], Request::ToolsList { id } if id_key(id) == "\"x\""));
        assert!(matches!(&kinds[2], Request::Other));
        assert!(matches!(&kinds[3], Request::BadToolCall { .. }));
        assert!(matches!(&kinds[4], Request::OtherRequest { .. }));
    }

    #[test]
    fn what_a_tool_might_read_differently_is_refused() {
        let dup = RawValue::from_string(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#.into(),
        )
        .unwrap();
        assert!(matches!(classify(&dup), Request::Invalid { .. }));
        let dup_name = RawValue::from_string(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"shell"}}"#.into(),
        )
        .unwrap();
        assert!(matches!(classify(&dup_name), Request::BadToolCall { .. }));
        let escaped = RawValue::from_string(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools\/call","params":{"name":"shell"}}"#.into(),
        )
        .unwrap();
        assert!(matches!(classify(&escaped), Request::ToolCall { tool, .. } if tool == "shell"));
        let note = RawValue::from_string(
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"shell"}}"#.into(),
        )
        .unwrap();
        assert!(matches!(
            classify(&note),
            Request::BadToolCall { id: None, .. }
        ));
        let number = RawValue::from_string("42".into()).unwrap();
        assert!(matches!(classify(&number), Request::Invalid { .. }));
        // A null id makes a request look like a notification to some, like a request to others.
        for id in ["null", "true", "{}", "[1]"] {
            let odd = RawValue::from_string(format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#
            ))
            .unwrap();
            assert!(matches!(classify(&odd), Request::Invalid { .. }), "{id}");
        }
        for id in ["7", "-1", "\"x\"", "1.5"] {
            let fine = RawValue::from_string(format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#
            ))
            .unwrap();
            assert!(matches!(classify(&fine), Request::ToolsList { .. }), "{id}");
        }
        // An answer with a null id is an answer all the same (judged as one nobody asked for).
        assert!(matches!(
            classify_reply(r#"{"jsonrpc":"2.0","id":null,"result":{"tools":[]}}"#),
            Reply::Result { .. }
        ));
        assert!(matches!(
            classify_reply(r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1}}"#),
            Reply::Invalid
        ));
        assert!(matches!(
            classify_reply(r#"{"jsonrpc":"2.0","id":1,"result":{},"result":{"x":1}}"#),
            Reply::Invalid
        ));
    }

    #[test]
    fn a_lone_message_reads_as_it_would_in_a_batch() {
        for text in [
            " \r\n\t{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"calc\",\"arguments\":{\"a\":1}}}\n ",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{},"result":{"x":1}}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"shell"}}"#,
            r#"42"#,
            r#""tools/call""#,
            r#"null"#,
        ] {
            let lone = parse_body(text.as_bytes()).unwrap();
            let batch = format!("[{text}]");
            let batch = parse_body(batch.as_bytes()).unwrap();
            let (a, b) = (&lone.messages[0], &batch.messages[0]);
            assert_eq!(a.get(), b.get(), "{text}");
            let kind = |r: Request<'_>| match r {
                Request::ToolCall {
                    id,
                    tool,
                    arguments,
                } => {
                    format!("call {} {tool} {arguments}", id.get())
                }
                Request::ToolsList { id } => format!("list {}", id.get()),
                Request::BadToolCall { id, reason } => {
                    format!("bad {:?} {reason}", id.map(RawValue::get))
                }
                Request::Invalid { reason } => format!("invalid {reason}"),
                Request::OtherRequest { id } => format!("other {}", id.get()),
                Request::Other => "other".into(),
            };
            assert_eq!(
                kind(classify_message(a)),
                kind(classify_message(b)),
                "{text}"
            );
            let reply = |r: Reply<'_>| match r {
                Reply::Result { id, result } => format!("result {} {}", id.get(), result.get()),
                Reply::Error { id, .. } => format!("error {}", id.get()),
                Reply::Other => "other".into(),
                Reply::Invalid => "invalid".into(),
            };
            assert_eq!(
                reply(classify_reply_message(a)),
                reply(classify_reply_message(b)),
                "{text}"
            );
        }
        assert!(parse_body(br#"{"jsonrpc":"2.0"} x"#).is_err());
    }

    #[test]
    fn rejects_what_is_not_json() {
        assert!(parse_body(b"{nope").is_err());
        assert!(parse_body(b"[]").is_err());
        assert!(parse_body(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn rewrites_arguments_and_results() {
        let body = parse_body(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":"x"}}}"#,
        )
        .unwrap();
        let m = with_arguments(body.messages[0].get(), r#"{"a":"[REDACTED:email]"}"#).unwrap();
        assert!(m.contains("[REDACTED:email]"), "{m}");
        let r = with_result(
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            serde_json::json!({"ok":1}),
        )
        .unwrap();
        assert!(r.contains(r#""ok":1"#));
        assert!(matches!(classify_reply(&r), Reply::Result { .. }));
        assert_eq!(join(&["1".into(), "2".into()], true), "[1,2]");
    }
}

//! `perfecx demo-tools`: a small MCP server over stdio with the API reference's tool names, so
//! that `perfecx up` shows calls allowed, blocked and redacted with nothing else installed.
//!
//! Tools: `web_search` (canned results, one of which leaks an e-mail address and a card
//! number, for the sidecar to redact), `calculator` (`a op b`), `file_reader` (a file under the
//! current folder), and `code_executor` / `system_command`, which the shipped policies forbid
//! and which only say so if they are ever reached.

use std::io::{BufRead, Write};
use std::path::{Component, Path};

use serde_json::{Value, json};

const PROTOCOL_VERSION: &str = "2025-06-18";

/// Serves newline-delimited JSON-RPC on stdin/stdout until stdin closes.
pub fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(reply) = answer(&line) {
            writeln!(out, "{reply}")?;
            out.flush()?;
        }
    }
    Ok(())
}

/// The reply to one message; `None` for notifications.
fn answer(line: &str) -> Option<Value> {
    let msg: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Some(error(Value::Null, -32700, &format!("parse error: {e}"))),
    };
    let id = msg.get("id").cloned()?;
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match msg.get("method").and_then(Value::as_str).unwrap_or("") {
        "initialize" => json!({
            "protocolVersion": params.get("protocolVersion").and_then(Value::as_str).unwrap_or(PROTOCOL_VERSION),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "perfecx-demo-tools", "version": env!("CARGO_PKG_VERSION")},
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let args = params.get("arguments").cloned().unwrap_or(json!({}));
            match call(name, &args) {
                Ok(text) => json!({"content": [{"type": "text", "text": text}], "isError": false}),
                Err(text) => json!({"content": [{"type": "text", "text": text}], "isError": true}),
            }
        }
        other => return Some(error(id, -32601, &format!("method `{other}` not found"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn tools() -> Value {
    let string_arg = |name: &str, what: &str| json!({"type": "object", "properties": {name: {"type": "string", "description": what}}, "required": [name]});
    json!([
        {"name": "web_search", "description": "Search the web (canned results)", "inputSchema": string_arg("query", "what to search for")},
        {"name": "calculator", "description": "Evaluate `a op b` with op one of + - * /", "inputSchema": string_arg("expression", "such as 6 * 7")},
        {"name": "file_reader", "description": "Read a text file under the current folder", "inputSchema": string_arg("path", "a relative path")},
        {"name": "code_executor", "description": "Run code (forbidden by the shipped policies)", "inputSchema": string_arg("code", "source code")},
        {"name": "system_command", "description": "Run a shell command (forbidden by the shipped policies)", "inputSchema": string_arg("command", "a command line")},
    ])
}

fn arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, String> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string argument `{name}`"))
}

fn call(name: &str, args: &Value) -> Result<String, String> {
    match name {
        "web_search" => {
            let q = arg(args, "query")?;
            Ok(format!(
                "Results for {q:?}:\n1. perfecx documentation: https://docs.example.org/perfecx\n\
                 2. Support forum post by jane.doe@acme-corp.io: \"paid with card 4111 1111 1111 1111\"\n\
                 3. Release notes: https://docs.example.org/perfecx/releases"
            ))
        }
        "calculator" => calculate(arg(args, "expression")?).map(|v| v.to_string()),
        "file_reader" => {
            let path = Path::new(arg(args, "path")?);
            let inside = path
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside {
                return Err(format!(
                    "`{}` is outside the current folder",
                    path.display()
                ));
            }
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))
        }
        "code_executor" | "system_command" => Err(format!(
            "`{name}` is a demo: it never runs anything (and policies should forbid it)"
        )),
        other => Err(format!("unknown tool `{other}`")),
    }
}

fn calculate(expr: &str) -> Result<f64, String> {
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let [a, op, b] = parts.as_slice() else {
        return Err(format!("expected `a op b`, such as `6 * 7`, got `{expr}`"));
    };
    let num = |s: &str| {
        s.parse::<f64>()
            .map_err(|_| format!("`{s}` is not a number"))
    };
    let (a, b) = (num(a)?, num(b)?);
    match *op {
        "+" => Ok(a + b),
        "-" => Ok(a - b),
        "*" | "x" => Ok(a * b),
        "/" if b == 0.0 => Err("division by zero".into()),
        "/" => Ok(a / b),
        _ => Err(format!("unknown operator `{op}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaks_enough_mcp() {
        let init = answer(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26"}}"#).unwrap();
        assert_eq!(init["result"]["protocolVersion"], "2025-03-26");
        assert!(answer(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).is_none());
        let list = answer(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#).unwrap();
        assert_eq!(list["result"]["tools"].as_array().unwrap().len(), 5);
        let sum = answer(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"calculator","arguments":{"expression":"6 * 7"}}}"#).unwrap();
        assert_eq!(sum["result"]["content"][0]["text"], "42");
        let bad = answer(r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"file_reader","arguments":{"path":"../etc/passwd"}}}"#).unwrap();
        assert_eq!(bad["result"]["isError"], true);
        let unknown = answer(r#"{"jsonrpc":"2.0","id":5,"method":"resources/list"}"#).unwrap();
        assert_eq!(unknown["error"]["code"], -32601);
        assert_eq!(answer("{oops").unwrap()["error"]["code"], -32700);
    }
}

//! The tool servers behind the sidecar, and how requests reach them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::denial::{TooLarge, UpstreamFailed};
use super::stdio::StdioServer;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

pub enum Transport {
    /// An MCP server over Streamable HTTP.
    Mcp(Uri),
    /// An MCP server over stdio that the sidecar runs.
    Stdio(Arc<StdioServer>),
    /// A plain HTTP tool.
    Http(Uri),
}

pub struct Upstream {
    pub name: Arc<str>,
    pub transport: Transport,
}

/// Headers that belong to one connection, not to the message (RFC 9110, 7.6.1), and those the
/// sidecar sets itself.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// End-to-end headers of `from`.
pub fn forwardable(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !hop_by_hop(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Sends one request to an HTTP upstream; the response body streams.
pub async fn send_http(
    client: &HttpClient,
    upstream: &str,
    method: Method,
    uri: Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, UpstreamFailed> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = forwardable(headers);
    // Answers are inspected, so they must come uncompressed.
    req.headers_mut().remove(header::ACCEPT_ENCODING);
    let res = client.request(req).await.map_err(|e| UpstreamFailed {
        upstream: upstream.to_owned(),
        reason: describe_client_error(&e),
    })?;
    let (mut parts, body) = res.into_parts();
    parts.headers = forwardable(&parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() {
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
        let mut detail = String::new();
        while let Some(s) = source {
            detail = s.to_string();
            source = s.source();
        }
        return format!("cannot connect: {detail}");
    }
    let mut msg = e.to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Why a body could not be read whole.
pub enum ReadError {
    TooLarge(TooLarge),
    Failed(String),
}

/// Reads a body up to `cap` bytes.
pub async fn read_limited(body: Body, cap: u64, what: &'static str) -> Result<Bytes, ReadError> {
    let limit = usize::try_from(cap).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ReadError::TooLarge(TooLarge { limit: cap, what }))
        }
        Err(e) => {
            // axum wraps the length error; look through it.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(ReadError::TooLarge(TooLarge { limit: cap, what }));
                }
                source = s.source();
            }
            Err(ReadError::Failed(e.to_string()))
        }
    }
}

/// Whether a response's media type is `ty` (parameters ignored).
pub fn media_type_is(headers: &HeaderMap, ty: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(ty))
}

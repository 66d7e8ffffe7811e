//! The tool servers behind the sidecar, and how requests reach them.

use std::borrow::Cow;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::denial::{Compressed, TooLarge, UpstreamFailed};
use super::pool::Pool;
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
    /// The `Host` header for requests to an HTTP upstream, computed once rather than by the
    /// client for every request.
    pub host: Option<HeaderValue>,
    /// The connections to a plain HTTP tool ([`Transport::Http`]).
    pub pool: Option<Arc<Pool>>,
}

impl Upstream {
    pub fn new(name: Arc<str>, transport: Transport) -> Upstream {
        let host = match &transport {
            Transport::Mcp(uri) | Transport::Http(uri) => host_header(uri),
            Transport::Stdio(_) => None,
        };
        let pool = match &transport {
            Transport::Http(uri) => Pool::new(uri),
            Transport::Mcp(_) | Transport::Stdio(_) => None,
        };
        Upstream {
            name,
            transport,
            host,
            pool,
        }
    }
}

/// What the HTTP client would set as `Host` for `uri`: the host, and the port unless it is the
/// scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    };
    let value = match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
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

/// Keeps only the end-to-end headers of `headers`: the hop-by-hop ones above and those the
/// `Connection` header names (RFC 9110, 7.6.1). Removing in place: most messages carry one or
/// two such headers at most, and copying the rest into a new map costs more.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    while let Some(name) = headers.keys().find(|n| hop_by_hop(n)).cloned() {
        headers.remove(&name);
    }
}

/// The agent's request headers made fit to forward to `upstream`.
pub fn outgoing_headers(upstream: &Upstream, headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // Answers are inspected, so they must come uncompressed: without the header a server may
    // pick any coding (RFC 9110, 12.5.3).
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let Some(host) = &upstream.host {
        headers.insert(header::HOST, host.clone());
    }
}

/// Sends one request to an HTTP upstream; the response body streams.
pub async fn send_http(
    client: &HttpClient,
    upstream: &Upstream,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, UpstreamFailed> {
    outgoing_headers(upstream, &mut headers);
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let res = client.request(req).await.map_err(|e| UpstreamFailed {
        upstream: upstream.name.to_string(),
        reason: describe_client_error(&e),
    })?;
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // An error's body is judged as text or left out (`mcp::judged_http`), so the agent still
    // sees its status (a session gone, credentials asked for).
    let has_body = parts.status.is_success()
        && !matches!(parts.status, StatusCode::ACCEPTED | StatusCode::NO_CONTENT);
    refuse_compressed(&upstream.name, &parts.headers, has_body)?;
    Ok(Response::from_parts(parts, Body::new(body)))
}

pub fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
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

/// Reads a body up to `cap` bytes. A body that comes in one chunk, as a small one mostly does,
/// is returned as it came: no buffer list to collect it in, no copy.
pub async fn read_limited<B>(body: B, cap: u64, what: &'static str) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = usize::try_from(cap).unwrap_or(usize::MAX);
    let mut body = pin!(Limited::new(body, limit));
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| read_error(e, cap, what))?;
        // Trailers carry nothing to judge.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

fn read_error(
    e: Box<dyn std::error::Error + Send + Sync>,
    cap: u64,
    what: &'static str,
) -> ReadError {
    // axum wraps the length error; look through it.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ReadError::TooLarge(TooLarge { limit: cap, what });
        }
        source = s.source();
    }
    ReadError::Failed(e.to_string())
}

/// The content coding of a message whose body is not sent as it is: a `Content-Encoding` other
/// than `identity`. The sidecar judges only bodies it can read, and asks tools for uncompressed
/// answers, so such a body is refused, never passed on unread: the other end would decode
/// what was never inspected.
pub fn content_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// Refuses an agent's request whose body is compressed.
pub fn refuse_compressed_request(headers: &HeaderMap) -> Result<(), Compressed> {
    match content_coding(headers) {
        Some(coding) => Err(Compressed { coding }),
        None => Ok(()),
    }
}

/// Refuses a tool's answer that comes compressed although the sidecar asked for none.
/// `has_body`: whether it carries a body at all; one without (a 204, the answer to a HEAD) has
/// nothing to hide.
pub fn refuse_compressed(
    upstream: &str,
    headers: &HeaderMap,
    has_body: bool,
) -> Result<(), UpstreamFailed> {
    match content_coding(headers).filter(|_| has_body) {
        Some(coding) => Err(UpstreamFailed {
            upstream: upstream.to_owned(),
            reason: format!(
                "it answered compressed (Content-Encoding: {coding}) although the sidecar asked for no compression, and a compressed answer cannot be inspected"
            ),
        }),
        None => Ok(()),
    }
}

/// The JSON document a body not labelled JSON is all the same, if it is a JSON object, array or
/// string (after a byte-order mark, which JSON readers skip): the tool (or the agent) may parse
/// it as JSON whatever its label (`application/problem+json`, none at all), and then its
/// escapes (`\u0041`) would hide from a search of the text what it reads.
///
/// Python's reader also takes `NaN`, `Infinity` and `-Infinity` for numbers: a document that is
/// JSON but for those comes back owned, with them written `0`, to be judged, not forwarded.
pub fn as_json(text: &str) -> Option<Cow<'_, str>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let opens = matches!(
        text.trim_start().as_bytes().first(),
        Some(b'{' | b'[' | b'"')
    );
    if !opens {
        return None;
    }
    if perfecx_policy::is_json(text) {
        return Some(Cow::Borrowed(text));
    }
    without_nonfinite(text)
        .filter(|lenient| perfecx_policy::is_json(lenient))
        .map(Cow::Owned)
}

/// `text` with every `NaN`, `Infinity` and `-Infinity` that stands as a value outside its
/// strings (after `:`, `[`, `,` or nothing, and before a delimiter) written `0`; `None` when it
/// has none.
fn without_nonfinite(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = String::new();
    let (mut i, mut copied, mut in_string) = (0, 0, false);
    // The last byte outside strings that is not whitespace.
    let mut before = b'[';
    'bytes: while i < b.len() {
        match (in_string, b[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (true, _) => {}
            (false, b' ' | b'\t' | b'\n' | b'\r') => {}
            (false, c) if !matches!(before, b':' | b'[' | b',') => before = c,
            (false, c) => {
                before = c;
                for word in ["-Infinity", "Infinity", "NaN"] {
                    let after = b.get(i + word.len()).copied();
                    let ends = matches!(
                        after,
                        None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b']' | b'}')
                    );
                    if ends && b[i..].starts_with(word.as_bytes()) {
                        // `i` is on an ASCII byte, so on a character boundary.
                        out.push_str(&text[copied..i]);
                        out.push('0');
                        i += word.len();
                        copied = i;
                        continue 'bytes;
                    }
                }
            }
        }
        i += 1;
    }
    (copied > 0).then(|| {
        out.push_str(&text[copied..]);
        out
    })
}

/// Whether a response's media type is `ty` (parameters ignored).
pub fn media_type_is(headers: &HeaderMap, ty: &str) -> bool {
    // On bytes: a visible-ASCII value has no other whitespace to trim than spaces and tabs.
    headers
        .get(header::CONTENT_TYPE)
        .filter(|v| v.to_str().is_ok())
        .is_some_and(|v| {
            let v = v.as_bytes();
            let end = v.iter().position(|&b| b == b';').unwrap_or(v.len());
            v[..end].trim_ascii().eq_ignore_ascii_case(ty.as_bytes())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_under_any_label_is_read_as_a_reader_would() {
        assert_eq!(as_json(r#" {"a":1}"#).as_deref(), Some(r#" {"a":1}"#));
        assert_eq!(as_json("\u{feff}[1]").as_deref(), Some("[1]"));
        assert_eq!(as_json(r#""x""#).as_deref(), Some(r#""x""#));
        // Python reads these; the copy judged reads the same strings.
        assert_eq!(
            as_json(r#"{"a":NaN,"b":[-Infinity,Infinity],"c":"NaN \" Infinity"}"#).as_deref(),
            Some(r#"{"a":0,"b":[0,0],"c":"NaN \" Infinity"}"#)
        );
        assert_eq!(as_json("[ NaN ,\n-Infinity]").as_deref(), Some("[ 0 ,\n0]"));
        // Only where a value stands, as Python reads them.
        for text in [
            "",
            "42",
            "true",
            "{name} says hi",
            "{\"a\":nan}",
            "[NaN",
            "é{",
            "[1NaN]",
            "[NaN5]",
            "[-NaN]",
            "[NaN.5]",
            "{\"a\":\"x\"NaN}",
        ] {
            assert_eq!(as_json(text), None, "{text}");
        }
    }

    #[test]
    fn only_identity_is_no_content_coding() {
        let coding = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            content_coding(&h)
        };
        assert_eq!(coding(&[]), None);
        assert_eq!(coding(&["identity"]), None);
        assert_eq!(coding(&[" IDENTITY "]), None);
        assert_eq!(coding(&[""]), None);
        assert_eq!(coding(&["gzip"]).as_deref(), Some("gzip"));
        assert_eq!(coding(&["identity, br"]).as_deref(), Some("br"));
        assert_eq!(
            coding(&["identity\u{a0}"]).as_deref(),
            Some("identity\u{a0}")
        );
        assert_eq!(coding(&["identity", "deflate"]).as_deref(), Some("deflate"));
    }

    #[test]
    fn host_is_what_the_client_would_send() {
        let host = |u: &str| host_header(&u.parse().unwrap()).unwrap();
        assert_eq!(host("http://127.0.0.1:8081/api"), "127.0.0.1:8081");
        assert_eq!(host("http://tools.internal:80/"), "tools.internal");
        assert_eq!(host("http://tools.internal"), "tools.internal");
        assert_eq!(host("https://tools.internal:8443"), "tools.internal:8443");
    }

    #[test]
    fn media_type_ignores_parameters_case_and_spaces() {
        let is_json = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            media_type_is(&h, "application/json")
        };
        assert!(is_json("application/json"));
        assert!(is_json(" Application/JSON ; charset=utf-8"));
        assert!(!is_json("application/jsonx"));
        assert!(!is_json("text/plain; application/json"));
        assert!(!media_type_is(&HeaderMap::new(), "application/json"));
    }

    #[tokio::test]
    async fn a_body_in_chunks_is_joined_and_capped() {
        let chunks = |n: usize| {
            http_body_util::StreamBody::new(futures_util::stream::iter((0..n).map(|i| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(
                    i.to_string(),
                )))
            })))
        };
        assert!(matches!(read_limited(chunks(1), 10, "body").await, Ok(b) if b == "0"));
        assert!(matches!(read_limited(chunks(3), 10, "body").await, Ok(b) if b == "012"));
        assert!(matches!(read_limited(chunks(0), 10, "body").await, Ok(b) if b.is_empty()));
        assert!(matches!(
            read_limited(chunks(11), 10, "body").await,
            Err(ReadError::TooLarge(_))
        ));
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_in_place() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.append("connection", HeaderValue::from_static("X-Other"));
        h.insert("x-secret", HeaderValue::from_static("s"));
        h.insert("x-other", HeaderValue::from_static("o"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.append("x-trace", HeaderValue::from_static("a"));
        h.append("x-trace", HeaderValue::from_static("b"));
        h.insert("host", HeaderValue::from_static("agent.local"));
        h.insert("content-length", HeaderValue::from_static("2"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h);
        // The order of different names carries no meaning (RFC 9110, 5.3); that of one name's
        // values does.
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-trace"]);
        let traces: Vec<&HeaderValue> = h.get_all("x-trace").iter().collect();
        assert_eq!(traces, ["a", "b"]);
    }
}

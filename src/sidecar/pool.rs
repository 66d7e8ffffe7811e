//! Connections to a plain HTTP tool, each driven by the task of the request that uses it.
//!
//! hyper-util's pooled client runs every connection in a task of its own: a request reaches it
//! through a channel and the answer comes back through another, so every call wakes a second
//! task, often on the other worker thread (a futex call and a run-queue wait). A plain HTTP
//! tool's answer is read whole before it is judged, so the request's own task can drive the
//! connection for the whole exchange instead; between exchanges a connection waits in this
//! pool, not driven. The MCP path streams answers (event streams) and keeps the shared client.
//!
//! Idle connections are kept per thread: a connection is registered with the runtime of the
//! thread that opened it, and the sidecar serves tool traffic from one single-threaded runtime
//! per thread, so a connection taken up on another thread would have its every wake-up handed
//! across threads.
//!
//! Behaviour matches the shared client's: keep-alive connections reused most-recent first,
//! closed after 30 s idle; `TCP_NODELAY`; a 5 s connect timeout; a request that a reused
//! connection closed before it was sent goes out again on a new connection; errors read as the
//! client's do. Beyond it, an idempotent request (`GET`, `HEAD`, `PUT`, `DELETE`, ...) that a
//! reused connection lost after it was written, before an answer began, goes out again too: a
//! tool that closes idle connections can close one just as a request arrives (nginx retries the
//! same way).

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::response::Parts;
use http::{Request, Uri};
use http_body_util::Full;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::upstream::{ReadError, read_limited};

/// How long a connection may wait unused before it is closed (as the shared client).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a connection may take (as the shared client).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept at most per thread; more are closed when they come back.
const MAX_IDLE: usize = 512;

type Body = Full<Bytes>;

struct Conn {
    send: SendRequest<Body>,
    conn: Connection<TokioIo<TcpStream>, Body>,
    idle_since: Instant,
}

struct Idle {
    /// Per thread, oldest first: taken from the back, expired from the front.
    conns: HashMap<ThreadId, VecDeque<Conn>>,
    /// A task closes expired connections while any wait.
    reaping: bool,
}

pub struct Pool {
    host: String,
    port: u16,
    idle: Mutex<Idle>,
}

/// Why an exchange failed.
pub enum ExchangeError {
    /// No answer: the message reads as the shared client's errors do.
    Send(String),
    /// The answer's body could not be read whole.
    Body(ReadError),
}

impl Pool {
    /// A pool for the tool at `base` (an `http` URL: the configuration checks it). `None` when
    /// the URL names no host.
    pub fn new(base: &Uri) -> Option<Arc<Pool>> {
        let host = base.host()?;
        // An IPv6 literal comes bracketed in a URL; connecting takes it bare.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(Arc::new(Pool {
            host: host.to_owned(),
            port: base.port_u16().unwrap_or(80),
            idle: Mutex::new(Idle {
                conns: HashMap::new(),
                reaping: false,
            }),
        }))
    }

    /// Sends `req` (its URI in origin form, its `Host` set) and reads the answer's body whole,
    /// up to `cap` bytes.
    pub async fn exchange(
        self: &Arc<Self>,
        req: Request<Bytes>,
        cap: u64,
    ) -> Result<(Parts, Bytes), ExchangeError> {
        let again = req.method().is_idempotent().then(|| copy(&req));
        let mut req = req.map(Full::new);
        if let Some(mut conn) = self.checkout().await {
            match (drive(&mut conn, req, cap).await, again) {
                // Lost after it was written, with no answer begun: safe to send again.
                (Ok((Err(ExchangeError::Send(_)), _)), Some(copy)) => req = copy.map(Full::new),
                (Ok((result, reusable)), _) => {
                    if reusable {
                        self.put_back(conn);
                    }
                    return result;
                }
                // The connection was closed before the request went out: send it again on a
                // new one.
                (Err(unsent), _) => req = unsent,
            }
        }
        let mut conn = self.connect().await?;
        match drive(&mut conn, req, cap).await {
            Ok((result, reusable)) => {
                if reusable {
                    self.put_back(conn);
                }
                result
            }
            Err(_) => Err(ExchangeError::Send(
                "client error (SendRequest): connection closed before message completed".into(),
            )),
        }
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let conns = idle.conns.get_mut(&std::thread::current().id())?;
                let conn = conns.pop_back()?;
                if conn.idle_since.elapsed() >= IDLE_TIMEOUT {
                    // Everything older is expired too.
                    conns.clear();
                    return None;
                }
                conn
            };
            // Polling the connection once takes in a hang-up or a `Connection: close`, and
            // registers this task for its wake-ups.
            let ready = poll_fn(|cx| {
                if Pin::new(&mut conn.conn).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                Poll::Ready(matches!(conn.send.poll_ready(cx), Poll::Ready(Ok(()))))
            })
            .await;
            if ready {
                return Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<Conn, ExchangeError> {
        let failed = |detail: String| ExchangeError::Send(format!("cannot connect: {detail}"));
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed("connection timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ExchangeError::Send(format!("client error (Connect): {}", chain(&e))))?;
        Ok(Conn {
            send,
            conn,
            idle_since: Instant::now(),
        })
    }

    fn put_back(self: &Arc<Self>, mut conn: Conn) {
        let now = Instant::now();
        conn.idle_since = now;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.conns.entry(std::thread::current().id()).or_default();
        expire(conns, now);
        if conns.len() >= MAX_IDLE {
            return;
        }
        conns.push_back(conn);
        if !idle.reaping {
            idle.reaping = true;
            // Only within a runtime (always, on the request path).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(self)));
            } else {
                idle.reaping = false;
            }
        }
    }
}

/// A copy of `req` to send again.
fn copy(req: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Closes connections idle for longer than [`IDLE_TIMEOUT`] while any wait, then ends.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        idle.conns.retain(|_, conns| {
            expire(conns, now);
            !conns.is_empty()
        });
        if idle.conns.is_empty() {
            idle.reaping = false;
            return;
        }
    }
}

/// Drops the connections of `conns` idle for [`IDLE_TIMEOUT`] or longer.
fn expire(conns: &mut VecDeque<Conn>, now: Instant) {
    while conns
        .front()
        .is_some_and(|c| now.duration_since(c.idle_since) >= IDLE_TIMEOUT)
    {
        conns.pop_front();
    }
}

type Outcome = Result<(Parts, Bytes), ExchangeError>;

/// One exchange on `conn`, driving the connection in this task. `Err(req)`: the connection was
/// closed before the request went out. `Ok((_, true))`: the connection can be used again.
async fn drive(
    conn: &mut Conn,
    req: Request<Body>,
    cap: u64,
) -> Result<(Outcome, bool), Request<Body>> {
    let Conn { send, conn, .. } = conn;
    let sent = send.try_send_request(req);
    let mut work = pin!(async move {
        let res = match sent.await {
            Ok(res) => res,
            Err(mut e) => {
                return match e.take_message() {
                    Some(req) => Err(Err(req)),
                    None => Err(Ok(ExchangeError::Send(format!(
                        "client error (SendRequest): {}",
                        chain(e.error())
                    )))),
                };
            }
        };
        let (parts, body) = res.into_parts();
        match read_limited(body, cap, "tool's response").await {
            Ok(bytes) => Ok((parts, bytes)),
            Err(e) => Err(Ok(ExchangeError::Body(e))),
        }
    });
    let mut ended: Option<Result<(), hyper::Error>> = None;
    let result = poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = work.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if ended.is_some() {
                // The connection ended and the exchange cannot go on.
                let reason = match &ended {
                    Some(Err(e)) => chain(e),
                    _ => "connection closed before message completed".to_owned(),
                };
                return Poll::Ready(Err(Ok(ExchangeError::Send(format!(
                    "client error (SendRequest): {reason}"
                )))));
            }
            match Pin::new(&mut *conn).poll(cx) {
                Poll::Ready(r) => ended = Some(r),
                // The connection made what progress it could; the exchange was polled before
                // it, so poll it once more only if the connection ended.
                Poll::Pending => {
                    return match work.as_mut().poll(cx) {
                        Poll::Ready(r) => Poll::Ready(r),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    })
    .await;
    let reusable = ended.is_none();
    match result {
        Ok(answer) => Ok((Ok(answer), reusable)),
        Err(Ok(e)) => Ok((Err(e), false)),
        Err(Err(req)) => Err(req),
    }
}

/// An error and its causes, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers one request per connection, keep-alive in name, then hangs up: a reused
    /// connection is found closed and the request goes out on a new one.
    #[tokio::test]
    async fn a_connection_the_tool_closed_is_replaced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(s);
            }
        });
        let pool = Pool::new(&format!("http://{addr}").parse().unwrap()).unwrap();
        for _ in 0..3 {
            let req = Request::builder()
                .uri("/x")
                .header("host", addr.to_string())
                .body(Bytes::new())
                .unwrap();
            let Ok((parts, body)) = pool.exchange(req, 1024).await else {
                panic!("the exchange failed");
            };
            assert_eq!(parts.status, 200);
            assert_eq!(body, "ok");
            // Let the hang-up arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answers the first request of each connection and keeps it open, then reads the second
    /// and closes without an answer: a request lost after it was written.
    #[tokio::test]
    async fn an_idempotent_request_lost_after_it_was_written_goes_out_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for answer in [true, false] {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        if answer {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            s.write_all(ok).await.unwrap();
                        }
                    }
                });
            }
        });
        let pool = Pool::new(&format!("http://{addr}").parse().unwrap()).unwrap();
        let request = |method: http::Method| {
            Request::builder()
                .method(method)
                .uri("/x")
                .header("host", addr.to_string())
                .body(Bytes::new())
                .unwrap()
        };
        // A new connection, then the same one again: lost, and sent on a new one.
        for _ in 0..2 {
            let Ok((parts, body)) = pool.exchange(request(http::Method::GET), 1024).await else {
                panic!("the GET failed");
            };
            assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
        }
        // A POST is not repeated: the tool may have acted on it.
        match pool.exchange(request(http::Method::POST), 1024).await {
            Err(ExchangeError::Send(m)) => assert!(m.starts_with("client error"), "{m}"),
            _ => panic!("expected the POST to fail"),
        }
    }

    #[tokio::test]
    async fn a_dead_tool_reads_as_the_client_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::new(&format!("http://{addr}").parse().unwrap()).unwrap();
        let req = Request::builder().uri("/").body(Bytes::new()).unwrap();
        match pool.exchange(req, 1024).await {
            Err(ExchangeError::Send(m)) => assert!(m.starts_with("cannot connect: "), "{m}"),
            _ => panic!("expected a connect error"),
        }
    }
}

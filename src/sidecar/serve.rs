//! Serving a router on a listener: HTTP/1.1, `TCP_NODELAY`, a deadline for request headers
//! (slow clients are cut off rather than holding a connection), graceful shutdown with a grace
//! period; for the tool traffic, from one thread per CPU ([`serve_on_workers`]).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` is cancelled, then waits up to `grace` for open connections (event
/// streams do not end by themselves) to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("connections still open after the grace period; closing them");
    }
}

/// Serves `router` on `listener` from `workers` threads, each running a single-threaded runtime
/// of its own, as nginx runs one worker process per CPU. A connection and everything its
/// requests do (the calls to the tool included) then stay on one thread: no work-stealing
/// scheduler hands tasks between threads, and no futex wakes a sibling thread on every request.
/// The workers accept from the one socket (each through its own descriptor); connections go
/// to whichever worker is free first. Returns once every worker has stopped (see [`serve`]).
pub fn serve_on_workers(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    grace: Duration,
    workers: usize,
) -> std::io::Result<impl Future<Output = ()>> {
    let listener = listener.into_std()?;
    let mut stopped = Vec::with_capacity(workers);
    for i in 0..workers.max(1) {
        let socket = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (router, stop) = (router.clone(), stop.clone());
        let (done, finished) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("perfecx-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => serve(listener, router, stop, grace).await,
                        Err(e) => tracing::error!(error = %e, "a worker cannot serve the listener"),
                    }
                });
                // Dropping the runtime ends what is left: idle-connection reapers and the like.
                drop(runtime);
                let _ = done.send(());
            })?;
        stopped.push(finished);
    }
    Ok(async move {
        for worker in stopped {
            let _ = worker.await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn workers_answer_every_connection_and_stop_when_told() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/",
            get(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
        );
        let stop = CancellationToken::new();
        let stopped =
            serve_on_workers(listener, router, stop.clone(), Duration::from_secs(1), 2).unwrap();
        for _ in 0..20 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.contains("\r\n\r\nperfecx-worker-"), "{answer}");
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("every worker stops");
        // The last descriptor of the socket closed with the last worker.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}

//! A plain HTTP tool for the load benchmark (`benches/proxy_load.sh`): answers every request
//! with its body, as JSON.
//!
//! ```sh
//! cargo run --release --example bench_tool -- 127.0.0.1:18081
//! ```

use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_tool: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let app = axum::Router::new().fallback(|body: Bytes| async move {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("bench_tool: {e}");
        std::process::exit(1);
    }
}

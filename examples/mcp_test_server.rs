//! A small MCP server over stdio, for trying `mcp_command` upstreams and for the end-to-end
//! tests: `add`, `echo`, `shell` (harmless: it only echoes), `slow`, `progress`, `roots`,
//! `impatient`, `changed`, `initialized`, `initializations`, `leak`, `fail` (an `isError`
//! result) and `crash`.
//!
//! ```sh
//! cargo build --example mcp_test_server
//! # sidecar.yaml:  mcp_command: [target/debug/examples/mcp_test_server]
//! ```

#[path = "../tests/common/tools.rs"]
mod tools;

use rmcp::ServiceExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let service = match tools::TestTools::new()
        .serve(rmcp::transport::stdio())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mcp_test_server: {e}");
            std::process::exit(1);
        }
    };
    let _ = service.waiting().await;
}

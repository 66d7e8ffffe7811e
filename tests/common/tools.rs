//! The tools of the test MCP server (served over HTTP by the tests, over stdio by the
//! `mcp_test_server` example).
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResult, ContentBlock, InitializeRequestParams, InitializeResult,
    ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::{RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct AddArgs {
    pub a: i64,
    pub b: i64,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct TextArgs {
    pub text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct CommandArgs {
    pub command: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SlowArgs {
    pub ms: u64,
}

#[derive(Debug, Clone)]
pub struct TestTools {
    tool_router: ToolRouter<Self>,
    /// Whether the client sent `notifications/initialized`.
    initialized: Arc<AtomicBool>,
    /// How many `initialize` requests came.
    initializations: Arc<AtomicU64>,
}

impl TestTools {
    pub fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
            initialized: Arc::default(),
            initializations: Arc::default(),
        }
    }
}

impl Default for TestTools {
    fn default() -> Self {
        Self::new()
    }
}

#[tool_router]
impl TestTools {
    #[tool(description = "Add two numbers")]
    fn add(&self, Parameters(AddArgs { a, b }): Parameters<AddArgs>) -> String {
        (a + b).to_string()
    }

    #[tool(description = "Return the text")]
    fn echo(&self, Parameters(TextArgs { text }): Parameters<TextArgs>) -> String {
        text
    }

    #[tool(description = "Pretend to run a command (only echoes it)")]
    fn shell(&self, Parameters(CommandArgs { command }): Parameters<CommandArgs>) -> String {
        format!("ran {command}")
    }

    #[tool(description = "Answer after `ms` milliseconds, or when cancelled")]
    async fn slow(
        &self,
        Parameters(SlowArgs { ms }): Parameters<SlowArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> String {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => "done".into(),
            _ = ctx.ct.cancelled() => "cancelled".into(),
        }
    }

    #[tool(description = "Report progress 1 to 3 (when asked for it), then answer")]
    async fn progress(&self, ctx: RequestContext<RoleServer>) -> String {
        if let Some(token) = ctx.meta.get_progress_token() {
            for step in 1..=3 {
                let note = ProgressNotificationParam::new(token.clone(), f64::from(step));
                let _ = ctx.peer.notify_progress(note.with_total(3.0)).await;
            }
        }
        "done".into()
    }

    #[tool(description = "Log a line, ask the client for its roots, and say how many it has")]
    // Logging and requests from server to client are gone from protocol 2026-07-28; earlier
    // ones, which agents still speak, have them.
    #[allow(deprecated)]
    async fn roots(&self, ctx: RequestContext<RoleServer>) -> String {
        use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam};
        let note =
            LoggingMessageNotificationParam::new(LoggingLevel::Info, "asking for roots".into());
        let _ = ctx.peer.notify_logging_message(note).await;
        match ctx.peer.list_roots().await {
            Ok(r) => format!("{} roots", r.roots.len()),
            Err(e) => format!("no roots: {e}"),
        }
    }

    #[tool(description = "Ask the client for its roots, and give up after 300 ms")]
    #[allow(deprecated)]
    async fn impatient(&self, ctx: RequestContext<RoleServer>) -> String {
        use rmcp::model::{ListRootsRequest, ServerRequest};
        use rmcp::service::PeerRequestOptions;
        let request = ServerRequest::ListRootsRequest(ListRootsRequest {
            method: Default::default(),
            extensions: Default::default(),
        });
        let options = PeerRequestOptions::with_timeout(Duration::from_millis(300));
        match ctx.peer.send_request_with_option(request, options).await {
            // rmcp tells the client that it gave up, with `notifications/cancelled`.
            Ok(asked) => match asked.await_response().await {
                Ok(_) => "answered".into(),
                Err(e) => format!("gave up: {e}"),
            },
            Err(e) => format!("could not ask: {e}"),
        }
    }

    #[tool(description = "Say that the tool list changed")]
    async fn changed(&self, ctx: RequestContext<RoleServer>) -> String {
        let _ = ctx.peer.notify_tool_list_changed().await;
        "told".into()
    }

    #[tool(description = "Say whether the client sent notifications/initialized")]
    fn initialized(&self) -> String {
        let told = self.initialized.load(Ordering::Relaxed);
        if told { "told" } else { "not told" }.into()
    }

    #[tool(description = "Say how many initialize requests came")]
    fn initializations(&self) -> String {
        self.initializations.load(Ordering::Relaxed).to_string()
    }

    #[tool(description = "Return a secret and an e-mail address")]
    fn leak(&self) -> String {
        "key AKIAIOSFODNN7EXAMPLE, mail jane.doe@example.com".into()
    }

    #[tool(description = "Fail: a result with isError set")]
    fn fail(&self) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text("it failed")])
    }

    #[tool(description = "Exit the process (for restart tests)")]
    fn crash(&self) -> String {
        std::process::exit(3)
    }

    #[tool(description = "Report the process id")]
    fn pid(&self) -> String {
        std::process::id().to_string()
    }
}

#[tool_handler]
impl ServerHandler for TestTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    /// Counted, and answered with instructions that name the client; a client named `slow` is
    /// answered after a second, so that others can initialize meanwhile; for one named `fatal`,
    /// the server exits after half a second instead.
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, rmcp::ErrorData> {
        self.initializations.fetch_add(1, Ordering::Relaxed);
        match request.client_info.name.as_str() {
            "slow" => tokio::time::sleep(Duration::from_secs(1)).await,
            "fatal" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                std::process::exit(3);
            }
            _ => {}
        }
        context.peer.set_peer_info(request.clone());
        let mut answer = self.negotiate_initialize(&request)?;
        answer.instructions = Some(format!("answered for {}", request.client_info.name));
        Ok(answer)
    }

    async fn on_initialized(&self, _: NotificationContext<RoleServer>) {
        self.initialized.store(true, Ordering::Relaxed);
    }
}

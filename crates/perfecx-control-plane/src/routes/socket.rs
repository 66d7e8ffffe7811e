//! The WebSocket at `/agents/{agent_id}`.
//!
//! - The first message must be `{"type": "auth", "token": ...}` (that agent's token, or an API
//!   key with `read`), within `auth_timeout` (10 s); otherwise the socket is closed with code
//!   1008 (policy violation) and a reason. An extension: `"subscribe": [...]` in it limits the
//!   socket to those message types (`lagged` is always sent); the sidecar asks for
//!   `policy_bundle` alone, so that no metrics are computed for it.
//! - Then the server sends `{"type": ..., "data": ...}`: `policy_bundle` at once and whenever
//!   the agent's policies change, `policy_violation` for each violation it reports,
//!   `anomaly_detected` for each anomaly found in its behaviour, and `metrics_update` (the last
//!   hour, in the metrics shape) at once and every `metrics_interval` (5 s).
//! - The server pings every `ping_interval` (20 s); a client that sends nothing, not even a
//!   pong, for three intervals is dropped.
//! - A client too slow to read loses its oldest messages beyond `buffer` (256) and is then
//!   sent `{"type": "lagged", "data": {"dropped": N}}`; nobody else waits for it.
//! - Deleting the agent closes its sockets (code 1000); shutting the server down closes every
//!   socket (code 1001), so that clients go to another replica at once.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use axum::routing::get;
use perfecx_api::{ClientMessage, Scope, ServerMessage, Topic};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};

use super::metrics::{HOUR_MS, compute};
use crate::auth::authenticate;
use crate::error::ApiPath;
use crate::state::AppState;
use crate::store::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/agents/{agent_id}", get(upgrade))
}

async fn upgrade(
    State(state): State<AppState>,
    ApiPath(agent_id): ApiPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| serve(state, agent_id, socket))
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// What the first message asks for: a token, and which kinds of message (all when `None`).
struct Auth {
    token: String,
    subscribe: Option<Vec<Topic>>,
}

impl Auth {
    fn wants(&self, message: &ServerMessage) -> bool {
        match (&self.subscribe, message.topic()) {
            (Some(topics), Some(topic)) => topics.contains(&topic),
            _ => true,
        }
    }
}

/// The first message, or why it is not an auth message.
async fn auth_message(state: &AppState, socket: &mut WebSocket) -> Result<Auth, String> {
    let first = tokio::time::timeout(state.websocket().auth_timeout, socket.recv()).await;
    match first {
        Err(_) => Err("no auth message in time".into()),
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Auth { token, subscribe }) => Ok(Auth { token, subscribe }),
            Err(e) => Err(format!(
                "the first message must be {{\"type\":\"auth\",\"token\":...}}: {e}"
            )),
        },
        Ok(_) => Err("the first message must be a text auth message".into()),
    }
}

/// A close reason must fit a control frame (123 bytes).
fn short(reason: &str) -> &str {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

async fn serve(state: AppState, agent_id: String, mut socket: WebSocket) {
    let auth = match auth_message(&state, &mut socket).await {
        Ok(auth) => auth,
        Err(reason) => return close(socket, close_code::POLICY, short(&reason)).await,
    };
    let allowed = match authenticate(&state, &auth.token).await {
        Ok(who) => who.require_agent(&agent_id, Scope::Read).is_ok(),
        Err(_) => false,
    };
    if !allowed {
        let reason = "not allowed to watch this agent";
        return close(socket, close_code::POLICY, reason).await;
    }
    // Subscribe before reading the bundle, so that no change falls between the two.
    let mut messages = state.hub().subscribe(&agent_id);
    match super::policies::build_bundle(&state, &agent_id).await {
        Ok(bundle) => {
            let bundle = ServerMessage::PolicyBundle(bundle);
            if auth.wants(&bundle) && send(&mut socket, &bundle).await.is_err() {
                return;
            }
        }
        Err(_) => return close(socket, close_code::POLICY, "no such agent").await,
    }
    let settings = state.websocket().clone();
    let at_least = |d: Duration| d.max(Duration::from_millis(10));
    let mut metrics = tokio::time::interval(at_least(settings.metrics_interval));
    metrics.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Metrics are computed for each socket; none for one that did not ask for them.
    let metrics_wanted = auth
        .subscribe
        .as_ref()
        .is_none_or(|topics| topics.contains(&Topic::MetricsUpdate));
    let ping_every = at_least(settings.ping_interval);
    let mut pings = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            message = messages.recv() => {
                let message = match message {
                    Ok(message) => message,
                    Err(RecvError::Lagged(dropped)) => {
                        state.telemetry().socket_messages_dropped.inc_by(dropped);
                        ServerMessage::Lagged { dropped }
                    }
                    Err(RecvError::Closed) => {
                        return close(socket, close_code::NORMAL, "the agent was deleted").await;
                    }
                };
                if auth.wants(&message) && send(&mut socket, &message).await.is_err() {
                    return;
                }
            }
            _ = metrics.tick(), if metrics_wanted => {
                let end = now_ms();
                let update = match compute(&state, agent_id.clone(), end - HOUR_MS, end).await {
                    Ok(update) => update,
                    Err(e) => {
                        tracing::warn!(agent_id, error = ?e, "cannot compute a metrics update");
                        continue;
                    }
                };
                if send(&mut socket, &ServerMessage::MetricsUpdate(update)).await.is_err() {
                    return;
                }
            }
            _ = pings.tick() => {
                if heard.elapsed() > 3 * ping_every {
                    return close(socket, close_code::AWAY, "no answer to pings").await;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            () = state.closing() => {
                return close(socket, close_code::AWAY, "the control plane is shutting down").await;
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => heard = Instant::now(),
            },
        }
    }
}

async fn send(socket: &mut WebSocket, message: &ServerMessage) -> Result<(), ()> {
    let text = serde_json::to_string(message).map_err(|_| ())?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|_| ())
}

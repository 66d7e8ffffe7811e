//! The WebSocket at `/agents/{agent_id}`: the first message is `{"type": "auth", "token": ...}`
//! (that agent's token, or an API key with `read`); then the server sends
//! `{"type": ..., "data": ...}` messages: the agent's policy bundle at once and whenever it
//! changes, and each `policy_violation` it reports. Deleting the agent closes its sockets.
//!
//! Messages reach the sockets of this process; replicas do not relay them to each other yet.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use axum::routing::get;
use perfecx_api::{ClientMessage, Scope, ServerMessage};
use tokio::sync::broadcast::error::RecvError;

use crate::auth::authenticate;
use crate::error::ApiPath;
use crate::state::AppState;

/// How long a client may take to send its auth message.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

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

async fn refuse(mut socket: WebSocket, code: u16, reason: String) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

async fn serve(state: AppState, agent_id: String, mut socket: WebSocket) {
    let token = match tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Auth { token }) => token,
            Err(e) => {
                let reason =
                    format!("the first message must be {{\"type\":\"auth\",\"token\":...}}: {e}");
                return refuse(socket, close_code::POLICY, reason).await;
            }
        },
        _ => {
            return refuse(
                socket,
                close_code::POLICY,
                "expected an auth message".into(),
            )
            .await;
        }
    };
    let allowed = match authenticate(&state, &token).await {
        Ok(who) => who
            .require_agent(&agent_id, Scope::Read)
            .map_err(|e| format!("{e:?}")),
        Err(e) => Err(format!("{e:?}")),
    };
    if allowed.is_err() {
        return refuse(
            socket,
            close_code::POLICY,
            "not allowed to watch this agent".into(),
        )
        .await;
    }
    // Subscribe before reading the bundle, so that no change falls between the two.
    let mut messages = state.hub().subscribe(&agent_id);
    match super::policies::build_bundle(&state, &agent_id).await {
        Ok(bundle) => {
            if send(&mut socket, &ServerMessage::PolicyBundle(bundle))
                .await
                .is_err()
            {
                return;
            }
        }
        Err(_) => return refuse(socket, close_code::POLICY, "no such agent".into()).await,
    }
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => {
                    if send(&mut socket, &message).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => {
                    return refuse(socket, close_code::NORMAL, "the agent was deleted".into()).await;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
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

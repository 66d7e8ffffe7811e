use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Anomaly, MetricsResponse, PolicyBundle};

/// What the control plane sends on the WebSocket at `/agents/{agent_id}`:
/// `{"type": "...", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ServerMessage {
    AnomalyDetected(Anomaly),
    /// A `policy_violation` event's `data` as the sidecar reported it.
    PolicyViolation(Value),
    /// The metrics of the last hour, every few seconds.
    MetricsUpdate(MetricsResponse),
    /// A new policy bundle for the sidecar of this agent.
    PolicyBundle(PolicyBundle),
    /// This socket fell too far behind: the `dropped` oldest messages were not sent to it.
    Lagged {
        dropped: u64,
    },
}

impl ServerMessage {
    /// The message's `type`, which a client may subscribe to.
    pub fn topic(&self) -> Option<Topic> {
        match self {
            ServerMessage::AnomalyDetected(_) => Some(Topic::AnomalyDetected),
            ServerMessage::PolicyViolation(_) => Some(Topic::PolicyViolation),
            ServerMessage::MetricsUpdate(_) => Some(Topic::MetricsUpdate),
            ServerMessage::PolicyBundle(_) => Some(Topic::PolicyBundle),
            // Always sent: it says that messages were lost.
            ServerMessage::Lagged { .. } => None,
        }
    }
}

/// A kind of message a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    AnomalyDetected,
    PolicyViolation,
    MetricsUpdate,
    PolicyBundle,
}

/// What a client sends; the first message must be `{"type": "auth", "token": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Auth {
        token: String,
        /// An extension: only these kinds of message (and `lagged`), e.g. a sidecar that wants
        /// its policy bundles and not the metrics computed for dashboards. All when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscribe: Option<Vec<Topic>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_shapes() -> Result<(), serde_json::Error> {
        let auth: ClientMessage =
            serde_json::from_str(r#"{"type":"auth","token":"agt_1234567890abcdef"}"#)?;
        assert_eq!(
            auth,
            ClientMessage::Auth {
                token: "agt_1234567890abcdef".into(),
                subscribe: None,
            }
        );
        let only: ClientMessage = serde_json::from_str(
            r#"{"type":"auth","token":"agt_1","subscribe":["policy_bundle"]}"#,
        )?;
        assert_eq!(
            only,
            ClientMessage::Auth {
                token: "agt_1".into(),
                subscribe: Some(vec![Topic::PolicyBundle]),
            }
        );
        assert!(
            serde_json::from_str::<ClientMessage>(
                r#"{"type":"auth","token":"agt_1","subscribe":["gossip"]}"#
            )
            .is_err()
        );
        let violation = ServerMessage::PolicyViolation(serde_json::json!({"tool": "shell"}));
        assert_eq!(
            serde_json::to_value(&violation)?,
            serde_json::json!({"type": "policy_violation", "data": {"tool": "shell"}})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Lagged { dropped: 7 })?,
            serde_json::json!({"type": "lagged", "data": {"dropped": 7}})
        );
        Ok(())
    }
}

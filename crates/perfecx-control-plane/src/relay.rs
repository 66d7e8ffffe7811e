//! Several replicas on one PostgreSQL: what one accepts reaches the WebSocket clients of the
//! others, through LISTEN/NOTIFY.
//!
//! Notifications are small: they name what happened (these violation events of this agent were
//! stored, these anomalies, these agents' policies changed, this agent was deleted), and a
//! replica with watchers for that agent reads the rest from the database before passing it to
//! its own hub. Each notification carries its sender's id, so that a replica skips its own,
//! which it delivered locally already. The channel is named after the database and schema, so
//! that replicas share it and nothing else does.
//!
//! Like the local hub, this is best effort: a notification sent while a replica's listening
//! connection is down is lost to that replica (it reconnects, and logs the gap). On SQLite,
//! one process, there is nothing to relay.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::PgListener;

use crate::state::AppState;
use crate::store::{Store, StoreResult};

/// What happened, in a few bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// `policy_violation` events newly stored, in batch order.
    Violations {
        agent_id: String,
        event_ids: Vec<String>,
    },
    Anomalies {
        agent_id: String,
        anomaly_ids: Vec<String>,
    },
    /// The policy bundles of these agents changed.
    Bundles {
        agent_ids: Vec<String>,
    },
    Deleted {
        agent_id: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    #[serde(flatten)]
    note: Note,
}

/// NOTIFY payloads must stay under 8,000 bytes.
const MAX_PAYLOAD: usize = 7_000;

impl Note {
    fn split(self) -> Result<(Note, Note), Note> {
        fn halves(mut ids: Vec<String>) -> Result<(Vec<String>, Vec<String>), Vec<String>> {
            if ids.len() < 2 {
                return Err(ids);
            }
            let second = ids.split_off(ids.len() / 2);
            Ok((ids, second))
        }
        match self {
            Note::Violations {
                agent_id,
                event_ids,
            } => match halves(event_ids) {
                Ok((a, b)) => Ok((
                    Note::Violations {
                        agent_id: agent_id.clone(),
                        event_ids: a,
                    },
                    Note::Violations {
                        agent_id,
                        event_ids: b,
                    },
                )),
                Err(event_ids) => Err(Note::Violations {
                    agent_id,
                    event_ids,
                }),
            },
            Note::Anomalies {
                agent_id,
                anomaly_ids,
            } => match halves(anomaly_ids) {
                Ok((a, b)) => Ok((
                    Note::Anomalies {
                        agent_id: agent_id.clone(),
                        anomaly_ids: a,
                    },
                    Note::Anomalies {
                        agent_id,
                        anomaly_ids: b,
                    },
                )),
                Err(anomaly_ids) => Err(Note::Anomalies {
                    agent_id,
                    anomaly_ids,
                }),
            },
            Note::Bundles { agent_ids } => match halves(agent_ids) {
                Ok((a, b)) => Ok((
                    Note::Bundles { agent_ids: a },
                    Note::Bundles { agent_ids: b },
                )),
                Err(agent_ids) => Err(Note::Bundles { agent_ids }),
            },
            note @ Note::Deleted { .. } => Err(note),
        }
    }
}

/// Serialized notifications for `note`, split until each fits.
fn payloads(origin: &str, note: Note, out: &mut Vec<String>) {
    let envelope = Envelope {
        origin: origin.to_string(),
        note,
    };
    let Ok(text) = serde_json::to_string(&envelope) else {
        return;
    };
    if text.len() <= MAX_PAYLOAD {
        out.push(text);
        return;
    }
    match envelope.note.split() {
        Ok((a, b)) => {
            payloads(origin, a, out);
            payloads(origin, b, out);
        }
        // One id never makes 7,000 bytes: ids are UUIDs or agent ids of at most 128 bytes.
        Err(_) => tracing::warn!("a relay notification is too large to send"),
    }
}

/// This replica's side of the relay.
pub struct Relay {
    /// This replica's id, in every notification it sends.
    origin: String,
    /// `None` on SQLite.
    channel: Option<String>,
}

impl Relay {
    /// Names the channel on PostgreSQL; relays nothing on SQLite.
    pub async fn new(store: &Store) -> StoreResult<Relay> {
        let channel = if store.is_postgres() {
            let row = sqlx::query("SELECT CAST(current_database() AS TEXT) AS db, CAST(current_schema() AS TEXT) AS schema")
                .fetch_one(store.pool())
                .await?;
            let db: String = row.try_get("db")?;
            let schema: String = row.try_get("schema")?;
            let digest = Sha256::digest(format!("{db}\n{schema}").as_bytes());
            Some(format!("perfecx_{}", &hex::encode(digest)[..16]))
        } else {
            None
        };
        Ok(Relay {
            origin: uuid::Uuid::new_v4().simple().to_string(),
            channel,
        })
    }

    /// Tells the other replicas, if any can exist. Failures are logged: the local clients
    /// have their messages already.
    pub async fn announce(&self, store: &Store, note: Note) {
        let Some(channel) = &self.channel else {
            return;
        };
        let mut texts = Vec::new();
        payloads(&self.origin, note, &mut texts);
        for text in texts {
            let sent = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(&text)
                .execute(store.pool())
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot notify the other replicas");
            }
        }
    }
}

/// Listens for the other replicas' notifications (PostgreSQL only). Returns once listening,
/// with the task that relays them to this replica's clients.
pub async fn listen(
    state: AppState,
    database_url: &str,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(channel) = state.relay().channel.clone() else {
        return Ok(None);
    };
    let mut listener = PgListener::connect(database_url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for other replicas: {e}"))?;
    listener
        .listen(&channel)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for other replicas: {e}"))?;
    Ok(Some(tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(notification) => deliver(&state, notification.payload()).await,
                Err(e) => {
                    // `recv` reconnects on the next call; what was sent meanwhile is lost.
                    tracing::warn!(error = %e, "lost the relay connection; notifications sent until it is back are lost");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    })))
}

/// Passes another replica's news to this replica's watchers.
async fn deliver(state: &AppState, payload: &str) {
    let envelope: Envelope = match serde_json::from_str(payload) {
        Ok(envelope) => envelope,
        Err(e) => {
            tracing::warn!(error = %e, "ignored a relay notification that does not parse");
            return;
        }
    };
    if envelope.origin == state.relay().origin {
        return;
    }
    let hub = state.hub();
    let result = match envelope.note {
        Note::Violations {
            agent_id,
            event_ids,
        } => {
            if !hub.is_watched(&agent_id) {
                return;
            }
            state
                .store()
                .event_data(&agent_id, &event_ids)
                .await
                .map(|found| {
                    for data in found {
                        hub.publish(&agent_id, perfecx_api::ServerMessage::PolicyViolation(data));
                    }
                })
        }
        Note::Anomalies {
            agent_id,
            anomaly_ids,
        } => {
            if !hub.is_watched(&agent_id) {
                return;
            }
            state
                .store()
                .anomalies_by_id(&agent_id, &anomaly_ids)
                .await
                .map(|found| {
                    for anomaly in found {
                        hub.publish(
                            &agent_id,
                            perfecx_api::ServerMessage::AnomalyDetected(anomaly),
                        );
                    }
                })
        }
        Note::Bundles { agent_ids } => {
            crate::routes::policies::push_bundles(state, &agent_ids).await;
            Ok(())
        }
        Note::Deleted { agent_id } => {
            hub.close(&agent_id);
            state.monitor().forget(&agent_id).await;
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot relay another replica's messages");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_notes_are_split_to_fit() {
        let ids: Vec<String> = (0..1000)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let note = Note::Violations {
            agent_id: "a".repeat(128),
            event_ids: ids.clone(),
        };
        let mut out = Vec::new();
        payloads("origin", note, &mut out);
        assert!(out.len() > 1);
        let mut seen = Vec::new();
        for text in &out {
            assert!(text.len() <= MAX_PAYLOAD, "{}", text.len());
            match serde_json::from_str::<Envelope>(text) {
                Ok(Envelope {
                    origin,
                    note: Note::Violations { event_ids, .. },
                }) if origin == "origin" => seen.extend(event_ids),
                other => unreachable!("{other:?}"),
            }
        }
        assert_eq!(seen, ids);
        let mut out = Vec::new();
        payloads(
            "o",
            Note::Deleted {
                agent_id: "x".into(),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![r#"{"origin":"o","kind":"deleted","agent_id":"x"}"#]
        );
    }
}

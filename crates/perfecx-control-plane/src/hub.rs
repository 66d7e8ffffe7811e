//! Live messages for the WebSocket clients watching an agent, within this process (the relay
//! of `crate::relay` brings those of other replicas).
//!
//! One broadcast ring per watched agent: publishing never waits for a watcher. A watcher that
//! falls more than `backlog` messages behind loses the oldest ones, it alone, and learns how
//! many (`RecvError::Lagged`).

use std::collections::HashMap;
use std::sync::Mutex;

use perfecx_api::ServerMessage;
use tokio::sync::broadcast;

pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<ServerMessage>>>,
    backlog: usize,
}

impl Hub {
    /// `backlog`: messages a watcher may fall behind by before it misses some (at least 1).
    pub fn new(backlog: usize) -> Hub {
        Hub {
            channels: Mutex::default(),
            backlog: backlog.max(1),
        }
    }

    pub fn subscribe(&self, agent_id: &str) -> broadcast::Receiver<ServerMessage> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(agent_id.to_string())
            .or_insert_with(|| broadcast::channel(self.backlog).0)
            .subscribe()
    }

    /// Sends to the agent's watchers, if any; forgets the channel once nobody listens.
    pub fn publish(&self, agent_id: &str, message: ServerMessage) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = channels.get(agent_id)
            && sender.send(message).is_err()
        {
            channels.remove(agent_id);
        }
    }

    pub fn is_watched(&self, agent_id: &str) -> bool {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .get(agent_id)
            .is_some_and(|s| s.receiver_count() > 0)
    }

    /// Closes every socket of a deleted agent.
    pub fn close(&self, agent_id: &str) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.remove(agent_id);
    }
}

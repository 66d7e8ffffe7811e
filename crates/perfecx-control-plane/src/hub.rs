//! Live messages for the WebSocket clients watching an agent, within this process.

use std::collections::HashMap;
use std::sync::Mutex;

use perfecx_api::ServerMessage;
use tokio::sync::broadcast;

/// Messages a slow watcher may fall behind by before it misses some.
const BACKLOG: usize = 256;

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<ServerMessage>>>,
}

impl Hub {
    pub fn subscribe(&self, agent_id: &str) -> broadcast::Receiver<ServerMessage> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(agent_id.to_string())
            .or_insert_with(|| broadcast::channel(BACKLOG).0)
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

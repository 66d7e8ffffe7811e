//! What the control plane is started with.

use std::time::Duration;

use crate::ratelimit::RateLimits;
use crate::store::SqliteSync;

#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://path` or `postgres://...`.
    pub database_url: String,
    pub sqlite_sync: SqliteSync,
    /// The base URL clients reach this server at, for `monitoring_endpoint`; default the
    /// listening address.
    pub public_url: Option<String>,
    /// An admin key to accept (stored hashed on start); from `PERFECX_ADMIN_KEY`.
    pub admin_key: Option<String>,
    pub rate_limits: RateLimits,
    pub retention: Retention,
    pub websocket: WebSocketSettings,
    pub detection: DetectionSettings,
}

/// Anomaly detection's clock (see `crate::monitor`).
#[derive(Debug, Clone)]
pub struct DetectionSettings {
    /// How often the minutes of silent agents are judged.
    pub tick: Duration,
    /// How long after a minute's end its events may still arrive and count.
    pub lateness: Duration,
}

impl Default for DetectionSettings {
    fn default() -> DetectionSettings {
        DetectionSettings {
            tick: Duration::from_secs(5),
            lateness: Duration::from_secs(10),
        }
    }
}

/// The WebSocket at `/agents/{agent_id}`.
#[derive(Debug, Clone)]
pub struct WebSocketSettings {
    /// How long a client may take to send its auth message.
    pub auth_timeout: Duration,
    /// How often each socket gets a `metrics_update` (the last hour).
    pub metrics_interval: Duration,
    /// How often the server pings; a client silent for three intervals is dropped.
    pub ping_interval: Duration,
    /// Messages a socket may fall behind by; beyond that its oldest are dropped, and it is
    /// told how many.
    pub buffer: usize,
}

impl Default for WebSocketSettings {
    fn default() -> WebSocketSettings {
        WebSocketSettings {
            auth_timeout: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            buffer: 256,
        }
    }
}

/// How long things are kept, and how often that is enforced.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Events older than this (by their timestamp) are deleted.
    pub events: Duration,
    /// An active agent with no event for this long becomes inactive.
    pub inactive_after: Duration,
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            events: Duration::from_secs(30 * 24 * 3600),
            inactive_after: Duration::from_secs(300),
            interval: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Defaults for everything but the database.
    pub fn new(database_url: impl Into<String>) -> Config {
        Config {
            database_url: database_url.into(),
            sqlite_sync: SqliteSync::default(),
            public_url: None,
            admin_key: None,
            rate_limits: RateLimits::default(),
            retention: Retention::default(),
            websocket: WebSocketSettings::default(),
            detection: DetectionSettings::default(),
        }
    }
}

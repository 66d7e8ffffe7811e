//! Calls whose event stream an MCP server closed for the agent to resume.
//!
//! A server may end a POST's event stream before its answers, once the stream has carried an
//! event id, and the client then resumes it with a GET that sends `Last-Event-ID` (the 2025-11-25
//! spec's SSE polling). The calls open on such a stream, with their deadline, wait here for the
//! session's next resumed GET stream, which judges and counts their answers as the POST's stream
//! would have. Calls nobody resumes within [`RESUME_WINDOW`] are counted as errors.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::calls::Tracker;
use super::denial::Refusal;

/// How long closed calls wait for their agent to resume.
const RESUME_WINDOW: Duration = Duration::from_secs(300);
/// Sessions with closed calls kept at most per upstream; the longest waiting goes first.
const MAX_SESSIONS: usize = 1024;

/// A call's deadline, and the refusal its agent gets when it passes.
pub type Deadline = Option<(Instant, Refusal)>;

struct Closed {
    tracker: Tracker,
    deadline: Deadline,
    since: Instant,
}

/// The calls of one upstream waiting to be resumed, by the agent's session id (empty without
/// one).
///
/// A resumed stream takes all of its session's calls, whichever stream they were open on: the
/// answers are matched by their request ids, which are unique within a session.
#[derive(Default)]
pub struct Handovers {
    sessions: Mutex<HashMap<String, Closed>>,
}

impl Handovers {
    /// Keeps the open calls of `tracker`, whose stream the server closed, for the session's next
    /// resumed stream.
    pub fn hand_over(&self, session: String, tracker: Tracker, deadline: Deadline) {
        let now = Instant::now();
        let mut sessions = self.lock();
        // Counted as errors when dropped, after the lock is released.
        let mut expired = expire(&mut sessions, now);
        if !sessions.contains_key(&session) && sessions.len() >= MAX_SESSIONS {
            let oldest = sessions.iter().min_by_key(|(_, c)| c.since);
            if let Some(key) = oldest.map(|(k, _)| k.clone()) {
                expired.extend(sessions.remove(&key));
            }
        }
        match sessions.get_mut(&session) {
            Some(closed) => {
                closed.tracker.adopt(tracker);
                closed.deadline = earliest(closed.deadline.take(), deadline);
                closed.since = now;
            }
            None => {
                let closed = Closed {
                    tracker,
                    deadline,
                    since: now,
                };
                sessions.insert(session, closed);
            }
        }
        drop(sessions);
        drop(expired);
    }

    /// The calls waiting for `session` to resume, with their deadline.
    pub fn take(&self, session: &str) -> Option<(Tracker, Deadline)> {
        let mut sessions = self.lock();
        let expired = expire(&mut sessions, Instant::now());
        let closed = sessions.remove(session);
        drop(sessions);
        drop(expired);
        closed.map(|c| (c.tracker, c.deadline))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Closed>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn expire(sessions: &mut HashMap<String, Closed>, now: Instant) -> Vec<Closed> {
    let old: Vec<String> = sessions
        .iter()
        .filter(|(_, c)| now.duration_since(c.since) > RESUME_WINDOW)
        .map(|(k, _)| k.clone())
        .collect();
    old.iter().filter_map(|k| sessions.remove(k)).collect()
}

fn earliest(a: Deadline, b: Deadline) -> Deadline {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

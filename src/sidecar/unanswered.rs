//! Requests whose answer stream ended on the agent's side before their answers came: an agent
//! whose connection broke resumes with a GET and `Last-Event-ID`, and the server replays the
//! answers there. The sidecar no longer has those requests in hand then, and an answer it did
//! not see the request of is judged as a tool's output (`mcp.rs`). For the requests that are
//! neither `tools/call` nor `tools/list`, that would hold a `resources/read` to the rules of tool
//! output, where everything else passes untouched; so their ids are kept here, per session, for
//! the resumed stream to recognise.
//!
//! Bounded: the oldest entries go first, and entries older than [`KEPT_FOR`] are forgotten.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;

/// Entries kept at most, over every session.
const MAX_ENTRIES: usize = 4096;
/// How long an agent has to resume.
const KEPT_FOR: Duration = Duration::from_secs(600);

struct Entry {
    upstream: Arc<str>,
    session: HeaderValue,
    id: String,
    at: Instant,
}

#[derive(Default)]
pub struct Unanswered {
    entries: Mutex<VecDeque<Entry>>,
}

impl Unanswered {
    /// Keeps the ids of `session`'s requests to `upstream` whose answers may come on a resumed
    /// stream.
    pub fn keep(&self, upstream: &Arc<str>, session: &HeaderValue, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        for id in ids {
            if entries.len() == MAX_ENTRIES {
                entries.pop_front();
            }
            entries.push_back(Entry {
                upstream: upstream.clone(),
                session: session.clone(),
                id,
                at: now,
            });
        }
    }

    /// Takes the ids kept for `session` on `upstream`.
    pub fn take(&self, upstream: &str, session: &HeaderValue) -> Vec<String> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while entries
            .front()
            .is_some_and(|e| now.duration_since(e.at) > KEPT_FOR)
        {
            entries.pop_front();
        }
        let mut taken = Vec::new();
        entries.retain(|e| {
            let mine = &*e.upstream == upstream && e.session == *session;
            if mine {
                taken.push(e.id.clone());
            }
            !mine
        });
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_kept_per_session_and_bounded() {
        let kept = Unanswered::default();
        let (up, other): (Arc<str>, Arc<str>) = (Arc::from("fs"), Arc::from("web"));
        let (a, b) = (HeaderValue::from_static("a"), HeaderValue::from_static("b"));
        kept.keep(&up, &a, vec!["1".into(), "\"x\"".into()]);
        kept.keep(&up, &b, vec!["2".into()]);
        kept.keep(&other, &a, vec!["3".into()]);
        assert_eq!(kept.take("fs", &a), ["1", "\"x\""]);
        assert!(kept.take("fs", &a).is_empty(), "taken once");
        assert_eq!(kept.take("web", &a), ["3"]);

        let many: Vec<String> = (0..MAX_ENTRIES + 10).map(|i| i.to_string()).collect();
        kept.keep(&up, &a, many);
        let taken = kept.take("fs", &a);
        // Session b's entry went first, then the oldest of these.
        assert_eq!(taken.len(), MAX_ENTRIES);
        assert_eq!(taken.first().map(String::as_str), Some("10"));
        assert_eq!(taken.last().map(String::as_str), Some("4105"));
        assert!(kept.take("fs", &b).is_empty());
    }
}

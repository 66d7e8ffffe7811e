//! Requests whose answer stream ended on the agent's side before their answers came: an agent
//! whose connection broke resumes with a GET and `Last-Event-ID`, and the server replays the
//! answers there. The sidecar no longer has those requests in hand then, and an answer it did
//! not see the request of is judged as a tool's output (`mcp.rs`). For the requests that are
//! neither `tools/call` nor `tools/list`, that would hold a `resources/read` to the rules of tool
//! output, where everything else passes untouched; so their ids are kept here, per session, for
//! the resumed streams to recognise.
//!
//! An id is only ever let through as such while nothing says it could be a call's: the ids of
//! cut calls and tool lists are kept too, and poison their id; a call or tool list sent on the
//! session under a kept id removes it. So an agent cannot have a call's answer pass by reusing
//! the id of a resource read it cut.
//!
//! Bounded: at most [`MAX_ENTRIES`] over every session (the oldest go first), each for
//! [`KEPT_FOR`]; session ids longer than [`MAX_SESSION_ID`] bytes are not kept.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;

/// Entries kept at most, over every session.
const MAX_ENTRIES: usize = 4096;
/// How long an agent has to resume.
const KEPT_FOR: Duration = Duration::from_secs(600);
/// Longer session ids are not kept (the spec's are UUIDs, JWTs or hashes).
const MAX_SESSION_ID: usize = 256;

struct Entry {
    upstream: Arc<str>,
    session: Box<[u8]>,
    id: String,
    /// Neither a call nor a tool list: its answer may pass as it is.
    other: bool,
    at: Instant,
}

#[derive(Default)]
pub struct Unanswered {
    entries: Mutex<VecDeque<Entry>>,
    /// `entries.len()`, read without the lock: most POSTs find nothing to forget.
    len: AtomicUsize,
}

impl Unanswered {
    /// Keeps the open requests of `session` to `upstream` that a resumed stream may answer:
    /// `(id, other)`, `other` false for a call or tool list.
    pub fn keep(&self, upstream: &Arc<str>, session: &HeaderValue, open: Vec<(String, bool)>) {
        if open.is_empty() || session.len() > MAX_SESSION_ID {
            return;
        }
        let mut entries = self.lock();
        let now = Instant::now();
        expire(&mut entries, now);
        for (id, other) in open {
            if entries.len() == MAX_ENTRIES {
                pop_oldest(&mut entries);
            }
            entries.push_back(Entry {
                upstream: upstream.clone(),
                // A copy: the header's bytes share the whole request head's buffer.
                session: session.as_bytes().into(),
                id,
                other,
                at: now,
            });
        }
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// Forgets the ids of `session` on `upstream` that `judged` says are now a call's or a tool
    /// list's.
    pub fn forget(&self, upstream: &str, session: &HeaderValue, judged: impl Fn(&str) -> bool) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut entries = self.lock();
        entries.retain(|e| !(e.is(upstream, session) && judged(&e.id)));
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// The ids of `session` on `upstream` whose answers may pass as they are: kept, and only
    /// ever as requests that are neither calls nor tool lists. They stay kept, for another
    /// resume, until they expire.
    pub fn resumable(&self, upstream: &str, session: &HeaderValue) -> Vec<String> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut entries = self.lock();
        expire(&mut entries, Instant::now());
        self.len.store(entries.len(), Ordering::Relaxed);
        let mine = || entries.iter().filter(|e| e.is(upstream, session));
        let poisoned: HashSet<&str> = mine().filter(|e| !e.other).map(|e| e.id.as_str()).collect();
        let mut ids: Vec<String> = mine()
            .filter(|e| e.other && !poisoned.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entry {
    fn is(&self, upstream: &str, session: &HeaderValue) -> bool {
        &*self.upstream == upstream && *self.session == *session.as_bytes()
    }
}

fn expire(entries: &mut VecDeque<Entry>, now: Instant) {
    while entries
        .front()
        .is_some_and(|e| now.duration_since(e.at) > KEPT_FOR)
    {
        pop_oldest(entries);
    }
}

/// Drops the oldest entry; a poison takes the requests its id poisons with it, as they were
/// kept later and would outlive it.
fn pop_oldest(entries: &mut VecDeque<Entry>) {
    let Some(gone) = entries.pop_front() else {
        return;
    };
    if !gone.other {
        entries.retain(|e| {
            !(e.upstream == gone.upstream && e.session == gone.session && e.id == gone.id)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(ids: &[&str]) -> Vec<(String, bool)> {
        ids.iter().map(|i| (i.to_string(), true)).collect()
    }

    #[test]
    fn ids_are_kept_per_session_and_bounded() {
        let kept = Unanswered::default();
        let (up, web): (Arc<str>, Arc<str>) = (Arc::from("fs"), Arc::from("web"));
        let (a, b) = (HeaderValue::from_static("a"), HeaderValue::from_static("b"));
        kept.keep(&up, &a, other(&["1", "\"x\""]));
        kept.keep(&up, &b, other(&["2"]));
        kept.keep(&web, &a, other(&["3"]));
        assert_eq!(kept.resumable("fs", &a), ["\"x\"", "1"]);
        assert_eq!(
            kept.resumable("fs", &a),
            ["\"x\"", "1"],
            "kept for another resume"
        );
        assert_eq!(kept.resumable("web", &a), ["3"]);
        assert_eq!(kept.resumable("fs", &b), ["2"]);

        let many: Vec<String> = (0..MAX_ENTRIES).map(|i| format!("n{i}")).collect();
        kept.keep(
            &up,
            &b,
            other(&many.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        assert!(kept.resumable("fs", &a).is_empty(), "the oldest went first");
        assert_eq!(kept.resumable("fs", &b).len(), MAX_ENTRIES);

        let long = HeaderValue::from_str(&"s".repeat(MAX_SESSION_ID + 1)).unwrap();
        kept.keep(&up, &long, other(&["4"]));
        assert!(kept.resumable("fs", &long).is_empty());
    }

    #[test]
    fn an_id_that_was_a_calls_never_passes() {
        let kept = Unanswered::default();
        let up: Arc<str> = Arc::from("fs");
        let s = HeaderValue::from_static("s");
        // A resource read cut, then a call under the same id cut too.
        kept.keep(&up, &s, other(&["7", "8"]));
        kept.keep(&up, &s, vec![("7".into(), false)]);
        assert_eq!(kept.resumable("fs", &s), ["8"]);
        // A call sent under a kept id takes it out.
        kept.forget("fs", &s, |id| id == "8");
        assert!(kept.resumable("fs", &s).is_empty());

        // A poison evicted first takes what it poisons with it.
        let kept = Unanswered::default();
        kept.keep(&up, &s, vec![("7".into(), false)]);
        kept.keep(&up, &s, other(&["7"]));
        let filler: Vec<String> = (0..MAX_ENTRIES - 1).map(|i| format!("n{i}")).collect();
        kept.keep(
            &up,
            &s,
            other(&filler.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        let ids = kept.resumable("fs", &s);
        assert!(!ids.contains(&"7".to_owned()));
        assert_eq!(ids.len(), MAX_ENTRIES - 1);
    }
}

//! The spool: events waiting on disk while the control plane is unreachable (or the sender is
//! behind), sent again with their ids once it answers.
//!
//! `spool_dir` holds segment files named `{sequence:020}.jsonl`, one event per line (the API's
//! `NewEvent`, `event_id` included). A segment is only ever appended to, each append is
//! fsync'd before it counts as spooled, and a segment holds at most one batch, so that it is
//! sent as one request and deleted once accepted. Segments left by an earlier run are kept
//! and sent first; new events always go to a new segment.
//!
//! A line that does not parse (the tail of a write cut short by a crash, or a damaged record)
//! is skipped with a warning. The total size is bounded: beyond it an append fails with
//! [`SpoolError::Full`] and writes nothing.
//!
//! The methods do blocking file I/O: call them from a blocking thread.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use perfecx_api::NewEvent;

/// A segment larger than this was not written by a sidecar: it is set aside, not read.
const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const EXTENSION: &str = "jsonl";

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_events: usize,
    /// Every segment, oldest first, with its size in bytes.
    segments: BTreeMap<u64, u64>,
    total: u64,
    /// The segment appends go to; never one found at startup.
    open: Option<OpenSegment>,
    next: u64,
}

struct OpenSegment {
    seq: u64,
    file: File,
    events: usize,
}

/// The oldest segment's events, read back.
#[derive(Debug)]
pub struct Segment {
    pub seq: u64,
    pub events: Vec<NewEvent>,
    /// Lines that could not be read (each logged).
    pub skipped: usize,
}

#[derive(Debug)]
pub enum SpoolError {
    /// The spool holds `limit` bytes already, or would with this append.
    Full {
        limit: u64,
    },
    Io(io::Error),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Full { limit } => write!(f, "the spool is full ({limit} bytes)"),
            SpoolError::Io(e) => write!(f, "cannot write to the spool: {e}"),
        }
    }
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(e)
    }
}

impl Spool {
    /// Opens (creating it if need be) the spool in `dir`, finding the segments already there.
    /// `max_events` caps the events of one segment.
    pub fn open(dir: &Path, max_bytes: u64, max_events: usize) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut segments = BTreeMap::new();
        let mut total = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Some(seq) = segment_seq(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let size = entry.metadata()?.len();
            segments.insert(seq, size);
            total += size;
        }
        let next = segments.keys().next_back().map_or(0, |s| s + 1);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            max_events: max_events.max(1),
            segments,
            total,
            open: None,
            next,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends `events` and fsyncs them. All or nothing for up to `max_events` events (more are
    /// split over segments, each all or nothing).
    pub fn append(&mut self, events: &[NewEvent]) -> Result<(), SpoolError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(events.len());
        let mut bytes = 0u64;
        for event in events {
            let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
            line.push(b'\n');
            bytes += line.len() as u64;
            lines.push(line);
        }
        if self.total + bytes > self.max_bytes {
            return Err(SpoolError::Full {
                limit: self.max_bytes,
            });
        }
        for chunk in lines.chunks(self.max_events) {
            self.append_chunk(chunk)?;
        }
        Ok(())
    }

    /// Writes `lines` to the open segment (a new one when it would hold too many events).
    fn append_chunk(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.events + lines.len() > self.max_events)
        {
            self.open = None;
        }
        let open = match &mut self.open {
            Some(open) => open,
            None => {
                let seq = self.next;
                self.next += 1;
                let path = self.path(seq);
                let file = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(&path)?;
                // The new name must survive a power cut as well as the data.
                sync_dir(&self.dir);
                self.segments.insert(seq, 0);
                self.open.insert(OpenSegment {
                    seq,
                    file,
                    events: 0,
                })
            }
        };
        let seq = open.seq;
        let before = self.segments.get(&seq).copied().unwrap_or(0);
        let buf = lines.concat();
        let written = open
            .file
            .write_all(&buf)
            .and_then(|()| open.file.sync_data());
        if let Err(e) = written {
            // Cut the partial write off so that the next append starts on a fresh line, and
            // leave this segment alone from now on.
            let _ = open.file.set_len(before);
            let _ = open.file.sync_data();
            self.open = None;
            return Err(e);
        }
        open.events += lines.len();
        let size = before + buf.len() as u64;
        self.segments.insert(seq, size);
        self.total += buf.len() as u64;
        Ok(())
    }

    /// The oldest segment, read back (closed for appends first if it is the open one).
    /// Segments that cannot be read are set aside with a warning.
    pub fn oldest(&mut self) -> io::Result<Option<Segment>> {
        while let Some((&seq, &size)) = self.segments.iter().next() {
            if self.open.as_ref().is_some_and(|o| o.seq == seq) {
                self.open = None;
            }
            let path = self.path(seq);
            let bytes = if size > MAX_SEGMENT_BYTES {
                Err(io::Error::other(format!(
                    "{size} bytes is more than a sidecar writes to one segment"
                )))
            } else {
                fs::read(&path)
            };
            match bytes {
                Ok(bytes) => {
                    let (events, skipped) = parse_segment(&bytes, &path);
                    return Ok(Some(Segment {
                        seq,
                        events,
                        skipped,
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.forget(seq);
                }
                Err(e) => {
                    let aside = path.with_extension("unreadable");
                    tracing::error!(
                        file = %path.display(),
                        moved_to = %aside.display(),
                        error = %e,
                        "a spool segment cannot be read; it is set aside and its events are not sent"
                    );
                    fs::rename(&path, &aside)?;
                    self.forget(seq);
                }
            }
        }
        Ok(None)
    }

    /// Deletes a segment whose events were delivered (or given up on).
    pub fn remove(&mut self, seq: u64) -> io::Result<()> {
        if self.open.as_ref().is_some_and(|o| o.seq == seq) {
            self.open = None;
        }
        match fs::remove_file(self.path(seq)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.forget(seq);
        Ok(())
    }

    fn forget(&mut self, seq: u64) {
        if let Some(size) = self.segments.remove(&seq) {
            self.total = self.total.saturating_sub(size);
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXTENSION}"))
    }
}

fn segment_seq(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Makes a new file's name durable; not every platform or file system can, so failures are
/// ignored (the data itself is fsync'd regardless).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The events of a segment; unreadable lines are skipped with a warning and counted.
pub fn parse_segment(bytes: &[u8], file: &Path) -> (Vec<NewEvent>, usize) {
    let mut events = Vec::new();
    let mut skipped = 0;
    let ends_with_newline = bytes.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let count = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let last = i + 1 == count && !ends_with_newline;
        match serde_json::from_slice::<NewEvent>(line) {
            Ok(event) if event.event_id.is_some() => events.push(event),
            Ok(_) => {
                skipped += 1;
                tracing::warn!(file = %file.display(), line = i + 1, "skipped a spooled event without an event_id");
            }
            Err(e) => {
                skipped += 1;
                let what = if last {
                    "skipped the truncated tail of a spool segment (a write cut short)"
                } else {
                    "skipped a damaged line of a spool segment"
                };
                tracing::warn!(file = %file.display(), line = i + 1, error = %e, "{what}");
            }
        }
    }
    (events, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use perfecx_api::EventType;

    fn event(n: u64) -> NewEvent {
        let mut data = serde_json::Map::new();
        data.insert("n".into(), n.into());
        NewEvent {
            event_id: Some(uuid::Uuid::new_v4()),
            event_type: EventType::ToolExecution,
            timestamp: Some("2026-01-01T00:00:00.000Z".into()),
            data,
            context: serde_json::Map::new(),
        }
    }

    fn numbers(events: &[NewEvent]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.data["n"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn segments_round_trip_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 3).unwrap();
        assert!(spool.is_empty());
        let batch: Vec<_> = (0..5).map(event).collect();
        spool.append(&batch[..2]).unwrap();
        spool.append(&batch[2..]).unwrap(); // 2 + 3 > 3: a second segment
        let size = spool.total_bytes();
        assert!(size > 0);

        // A restart finds both, and never appends to them.
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20, 3).unwrap();
        assert_eq!(spool.total_bytes(), size);
        spool.append(&[event(5)]).unwrap();
        let first = spool.oldest().unwrap().unwrap();
        assert_eq!(numbers(&first.events), [0, 1]);
        assert_eq!(first.events[0].event_id, batch[0].event_id, "ids are kept");
        spool.remove(first.seq).unwrap();
        let second = spool.oldest().unwrap().unwrap();
        assert_eq!(numbers(&second.events), [2, 3, 4]);
        spool.remove(second.seq).unwrap();
        let third = spool.oldest().unwrap().unwrap();
        assert_eq!(numbers(&third.events), [5]);
        spool.remove(third.seq).unwrap();
        assert!(spool.oldest().unwrap().is_none());
        assert_eq!(spool.total_bytes(), 0);
    }

    #[test]
    fn a_truncated_tail_and_damaged_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        spool.append(&[event(1), event(2)]).unwrap();
        drop(spool);
        let path = dir.path().join(format!("{:020}.jsonl", 0));
        let mut text = std::fs::read(&path).unwrap();
        // A damaged record in the middle, then a write cut short by a crash.
        let good = serde_json::to_vec(&event(3)).unwrap();
        text.extend_from_slice(b"{\"event_id\": \x00garbage\n");
        text.extend_from_slice(&good);
        text.push(b'\n');
        text.extend_from_slice(&good[..good.len() / 2]);
        std::fs::write(&path, &text).unwrap();

        let mut spool = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        let segment = spool.oldest().unwrap().unwrap();
        assert_eq!(numbers(&segment.events), [1, 2, 3]);
        assert_eq!(segment.skipped, 2);

        let (events, skipped) = parse_segment(b"\xff\xfe not json", Path::new("x"));
        assert!(events.is_empty());
        assert_eq!(skipped, 1);
        assert_eq!(parse_segment(b"", Path::new("x")).1, 0);
    }

    #[test]
    fn the_size_limit_refuses_whole_appends() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&event(1)).unwrap().len() as u64 + 1;
        let mut spool = Spool::open(dir.path(), one * 2, 100).unwrap();
        spool.append(&[event(1)]).unwrap();
        let full = spool.append(&[event(2), event(3)]);
        assert!(matches!(full, Err(SpoolError::Full { .. })), "{full:?}");
        assert_eq!(spool.total_bytes(), one, "nothing of the refused append");
        spool.append(&[event(4)]).unwrap();
        let segment = spool.oldest().unwrap().unwrap();
        assert_eq!(numbers(&segment.events), [1, 4]);
    }

    #[test]
    fn other_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hi").unwrap();
        std::fs::write(dir.path().join("x.jsonl"), "hi").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, 10).unwrap();
        assert!(spool.is_empty());
        assert!(spool.oldest().unwrap().is_none());
        assert!(dir.path().join("notes.txt").exists());
    }
}

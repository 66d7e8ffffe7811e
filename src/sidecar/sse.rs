//! Server-sent events, split event by event as bytes arrive, so that a stream is inspected
//! without ever being buffered whole. Each event is capped.
//!
//! Line endings are made `\n` as bytes arrive (a stream may end its lines with `\r\n`, `\n`
//! or a lone `\r`) and a byte-order mark at its start is removed. Events are passed on rebuilt
//! from the fields read here ([`Event::rebuilt`]), never as they came: any client's parser then
//! reads the same events, and the same fields in them, as the sidecar judged.

/// One event: its raw bytes (terminating blank line included) and its joined `data` lines.
pub struct Event {
    raw: Vec<u8>,
}

#[derive(Debug)]
pub struct EventTooLarge;

impl Event {
    #[cfg(test)]
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.raw.split(|b| *b == b'\n').filter(|l| !l.is_empty())
    }

    /// The value of a field (the last, if several), its one leading space removed. An `id`
    /// that holds a NUL is ignored, as clients ignore it (the HTML standard's event streams).
    fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.lines()
            .filter_map(|l| match l.strip_prefix(name)? {
                [] => Some(&[][..]),
                [b':', b' ', v @ ..] | [b':', v @ ..] => Some(v),
                _ => None,
            })
            .filter(|v| name != b"id" || !v.contains(&0))
            .last()
    }

    /// The event as the sidecar passes it on, with `data` (the event's own, or what replaces
    /// it): its `event`, `id` and `retry` fields when their values are plain printable ASCII,
    /// then the data, with the characters that some clients' line splitters break lines at
    /// written as JSON escapes (the data is JSON, where they can only stand inside strings).
    /// Comments and other fields are left out; an event left with nothing is a bare comment,
    /// which still keeps the connection alive.
    pub fn rebuilt(&self, data: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        for name in [&b"event"[..], b"id", b"retry"] {
            let value = self.field(name);
            if let Some(v) = value.filter(|v| v.iter().all(|b| (0x20..0x7f).contains(b))) {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(v);
                out.push(b'\n');
            }
        }
        if let Some(data) = data {
            for line in data.split('\n') {
                out.extend_from_slice(b"data: ");
                for c in line.chars() {
                    match c {
                        '\u{b}'
                        | '\u{c}'
                        | '\u{1c}'..='\u{1e}'
                        | '\u{85}'
                        | '\u{2028}'
                        | '\u{2029}' => {
                            out.extend_from_slice(format!("\\u{:04x}", u32::from(c)).as_bytes())
                        }
                        c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out.push(b'\n');
            }
        }
        if out.is_empty() {
            out.extend_from_slice(b":\n");
        }
        out.push(b'\n');
        out
    }

    /// The event's id, if it has an `id` field: where a client resumes the stream from (empty:
    /// from nowhere any more).
    pub fn id(&self) -> Option<&str> {
        std::str::from_utf8(self.field(b"id")?).ok()
    }

    /// How long the server asks clients to wait before they reconnect, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        std::str::from_utf8(self.field(b"retry")?)
            .ok()?
            .parse()
            .ok()
    }

    /// Whether the event is a message event (no type, or `message`): the only ones MCP clients
    /// read.
    pub fn is_message(&self) -> bool {
        matches!(self.field(b"event"), None | Some(b"" | b"message"))
    }

    /// Whether the event has a `data` field at all.
    pub fn has_data(&self) -> bool {
        self.lines()
            .any(|l| l.starts_with(b"data:") || l == b"data")
    }

    /// The event's data (lines joined by `\n`), if it has any and it is UTF-8.
    pub fn data(&self) -> Option<String> {
        let mut data: Option<String> = None;
        for line in self.lines() {
            let Some(rest) = line.strip_prefix(b"data") else {
                continue;
            };
            let value = match rest {
                [] => &[][..],
                [b':', b' ', v @ ..] | [b':', v @ ..] => v,
                _ => continue,
            };
            let value = std::str::from_utf8(value).ok()?;
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
        data
    }
}

/// A message event made by the sidecar.
pub fn message_event(data: &str) -> Vec<u8> {
    format!("event: message\ndata: {data}\n\n").into_bytes()
}

/// A message event made by the sidecar, with the id a client resumes from.
pub fn numbered_message_event(id: u64, data: &str) -> Vec<u8> {
    format!("id: {id}\nevent: message\ndata: {data}\n\n").into_bytes()
}

pub struct Parser {
    buf: Vec<u8>,
    /// Where to resume looking for the end of the current event.
    scanned: usize,
    max: usize,
    /// The last byte read was a `\r`: a `\n` right after it ends the same line.
    after_cr: bool,
    /// Nothing of the stream has been read yet, where a byte-order mark is not part of it.
    at_start: bool,
}

const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

impl Parser {
    pub fn new(max: usize) -> Parser {
        Parser {
            buf: Vec::new(),
            scanned: 0,
            max,
            after_cr: false,
            at_start: true,
        }
    }

    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Event>, EventTooLarge> {
        self.append(chunk);
        if self.at_start {
            if self.buf.len() < BYTE_ORDER_MARK.len() && BYTE_ORDER_MARK.starts_with(&self.buf) {
                return Ok(Vec::new());
            }
            if self.buf.starts_with(BYTE_ORDER_MARK) {
                self.buf.drain(..BYTE_ORDER_MARK.len());
            }
            self.at_start = false;
        }
        let mut events = Vec::new();
        while let Some(end) = self.event_end() {
            let rest = self.buf.split_off(end);
            let raw = std::mem::replace(&mut self.buf, rest);
            self.scanned = 0;
            events.push(Event { raw });
        }
        if self.buf.len() > self.max {
            return Err(EventTooLarge);
        }
        Ok(events)
    }

    /// Appends bytes with every line ending made `\n`.
    fn append(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
            self.after_cr = false;
        }
        if !rest.contains(&b'\r') {
            self.buf.extend_from_slice(rest);
            return;
        }
        let mut i = 0;
        while i < rest.len() {
            match rest[i] {
                b'\r' => {
                    self.buf.push(b'\n');
                    match rest.get(i + 1) {
                        Some(b'\n') => i += 1,
                        None => self.after_cr = true,
                        Some(_) => {}
                    }
                }
                b => self.buf.push(b),
            }
            i += 1;
        }
    }

    /// What is left when the stream ends (an event without its final blank line, which a client
    /// does not dispatch), if anything. The parser is then ready for another stream.
    pub fn finish(&mut self) -> Option<Event> {
        self.scanned = 0;
        self.after_cr = false;
        self.at_start = true;
        let raw = std::mem::take(&mut self.buf);
        raw.iter()
            .any(|b| !b.is_ascii_whitespace())
            .then_some(Event { raw })
    }

    /// The index just past the blank line that ends the first event, if it has arrived.
    fn event_end(&mut self) -> Option<usize> {
        let from = self.scanned;
        match self.buf[from..].windows(2).position(|w| w == b"\n\n") {
            Some(at) => Some(from + at + 2),
            None => {
                self.scanned = self.buf.len().saturating_sub(1);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_chunks() {
        let mut p = Parser::new(1024);
        let mut all = Vec::new();
        let stream =
            b"id: 1\nevent: message\ndata: {\"a\":\r\ndata: 1}\r\n\r\n: comment\n\ndata: x\n\n";
        for chunk in stream.chunks(3) {
            all.extend(p.push(chunk).unwrap());
        }
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].data().as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(all[1].data(), None);
        assert_eq!(all[2].data().as_deref(), Some("x"));
        let rewritten = all[0].rebuilt(Some("{}"));
        assert_eq!(rewritten, b"event: message\nid: 1\ndata: {}\n\n");
        assert_eq!(all[1].rebuilt(None), b":\n\n");
        assert!(p.finish().is_none());
    }

    #[test]
    fn reads_every_line_ending_and_a_byte_order_mark_as_a_client_does() {
        let mut p = Parser::new(1024);
        let mut all = Vec::new();
        // A lone CR ends a line (and with another, an event); a CRLF split across chunks is one
        // line ending; the mark at the start is not part of the first field's name.
        let stream = b"\xEF\xBB\xBFid: 1\rdata: a\r\rdata: b\r\n\r\ndata: c\n\r\n";
        for chunk in stream.chunks(1) {
            all.extend(p.push(chunk).unwrap());
        }
        let data: Vec<_> = all.iter().map(|e| e.data()).collect();
        assert_eq!(data, [Some("a".into()), Some("b".into()), Some("c".into())]);
        assert_eq!(all[0].id(), Some("1"));
        assert_eq!(all[0].raw(), b"id: 1\ndata: a\n\n");
        assert!(p.finish().is_none());
        // The parser reads the next stream from its start.
        let next = p.push(b"\xEF\xBB\xBFdata: d\n\n").unwrap();
        assert_eq!(next[0].data().as_deref(), Some("d"));
    }

    #[test]
    fn passes_on_only_what_every_client_reads_alike() {
        let mut p = Parser::new(1024);
        let events = p
            .push("event: message\u{b}data: x\nid: 2\u{2028}\nretry: 5\n: note\ndata: {\"a\":\"\u{2028}\u{85}\"}\n\n".as_bytes())
            .unwrap();
        let data = events[0].data();
        assert_eq!(
            String::from_utf8(events[0].rebuilt(data.as_deref())).unwrap(),
            "retry: 5\ndata: {\"a\":\"\\u2028\\u0085\"}\n\n"
        );
    }

    #[test]
    fn reads_the_id_and_retry_a_client_resumes_by() {
        let mut p = Parser::new(1024);
        let events = p
            .push(b"id: 7\nretry: 250\ndata: \n\nid:8\nid: 9\ndata: x\n\nid:\nretry: soon\n\ndata: y\n\n")
            .unwrap();
        assert_eq!((events[0].id(), events[0].retry()), (Some("7"), Some(250)));
        assert_eq!((events[1].id(), events[1].retry()), (Some("9"), None));
        assert_eq!((events[2].id(), events[2].retry()), (Some(""), None));
        assert_eq!((events[3].id(), events[3].retry()), (None, None));
        // An id holding a NUL is ignored, as a client ignores it.
        let events = p.push(b"id: 5\nid: 6\0\ndata: z\n\n").unwrap();
        assert_eq!(events[0].id(), Some("5"));
    }

    #[test]
    fn tells_missing_data_from_unreadable_data() {
        let mut p = Parser::new(64);
        let events = p.push(b"id: 1\n\ndata: \xff\n\n").unwrap();
        assert!(!events[0].has_data());
        assert!(events[1].has_data() && events[1].data().is_none());
    }

    #[test]
    fn caps_an_event() {
        let mut p = Parser::new(8);
        assert!(p.push(b"data: 0123456789").is_err());
    }
}

//! The search for literal patterns (forbidden patterns and sensitive-data triggers): one
//! Aho-Corasick DFA, ignoring ASCII case, reporting every occurrence, overlapping ones included.
//!
//! `aho-corasick` builds the automaton; this module copies it into a table shaped for its own
//! search loop. A DFA search is bound by the latency of one table load per byte: each transition
//! waits for the one before. A long haystack is therefore cut into [`LANES`] pieces searched in
//! one interleaved loop, whose independent chains of loads overlap in the CPU. Each piece after
//! the first starts `max_pattern_len - 1` bytes early, so that the automaton is in its true state
//! by the piece's first byte, and reports only the occurrences that end inside the piece: every
//! occurrence is reported once, whatever the cut.

use std::collections::HashMap;
use std::ops::Range;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::Builder;
use aho_corasick::{Anchored, MatchKind, PatternID};

/// Pieces searched together: enough chains of loads to fill the load ports, few enough that
/// every lane's state stays in a register.
const LANES: usize = 4;

/// The bit of a state id that marks a match state.
const MATCH: u32 = 1 << 31;

/// Each piece must be this much longer than the overlap before cutting pays off.
const MIN_PIECE: usize = 128;

#[derive(Debug)]
pub(crate) struct Matcher {
    /// For each byte, its column in a state's row: bytes that occur in no pattern share column
    /// 0, and the two cases of an ASCII letter share one.
    column: [u32; 256],
    /// One row of `columns` entries per state, each entry the id of the next state: the offset
    /// of its row, with [`MATCH`] set if the state ends a pattern. The search steps only from
    /// states without the flag (it stops at a match state and clears the flag before going on),
    /// so that an index is a row offset plus a column, in bounds by construction: the step is an
    /// add and a load, with nothing on that chain to mask or decode.
    next: Box<[u32]>,
    start: u32,
    columns: u32,
    /// The patterns that end in match state `i`: `ends[spans[i].clone()]`.
    spans: Vec<Range<u32>>,
    ends: Vec<u32>,
    lens: Vec<u32>,
    /// `max_pattern_len - 1`: how far before its piece a lane starts.
    overlap: usize,
}

impl Matcher {
    /// Builds the automaton over `patterns` (already normalized, none empty); fails only when
    /// they are too many for the automaton's state IDs.
    pub(crate) fn new<P: AsRef<[u8]>>(patterns: &[P]) -> Result<Matcher, String> {
        let dfa = Builder::new()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .prefilter(false)
            .build(patterns)
            .map_err(|e| e.to_string())?;
        let start = dfa.start_state(Anchored::No).map_err(|e| e.to_string())?;

        // Columns: one per byte (ASCII case folded) that some pattern holds, plus column 0.
        let mut column = [0u32; 256];
        let mut sample: Vec<u8> = vec![0];
        for &b in patterns.iter().flat_map(|p| p.as_ref()) {
            let b = b.to_ascii_lowercase();
            if column[usize::from(b)] == 0 {
                column[usize::from(b)] = sample.len() as u32;
                column[usize::from(b.to_ascii_uppercase())] = sample.len() as u32;
                sample.push(b);
            }
        }
        // Column 0 needs a byte that no pattern holds, to ask the automaton where it leads.
        let Some(other) = (0..=255u8).find(|&b| column[usize::from(b)] == 0) else {
            return Err("patterns use every byte value".to_owned());
        };
        sample[0] = other;
        let columns = sample.len() as u32;

        // Every reachable state, match states first.
        let mut states = vec![start];
        let mut seen: HashMap<StateID, ()> = HashMap::from([(start, ())]);
        let mut i = 0;
        while let Some(&sid) = states.get(i) {
            for &b in &sample {
                let to = dfa.next_state(Anchored::No, sid, b);
                if seen.insert(to, ()).is_none() {
                    states.push(to);
                }
            }
            i += 1;
        }
        // Match states first, so that the id without its flag indexes `spans`.
        states.sort_by_key(|&sid| !dfa.is_match(sid));
        let entries = states.len() * columns as usize;
        if entries > MATCH as usize {
            return Err("too many automaton states".to_owned());
        }
        let id: HashMap<StateID, u32> = states
            .iter()
            .enumerate()
            .map(|(i, &sid)| {
                let flag = if dfa.is_match(sid) { MATCH } else { 0 };
                (sid, (i as u32 * columns) | flag)
            })
            .collect();
        let mut next = vec![0u32; entries].into_boxed_slice();
        let mut spans = Vec::new();
        let mut ends = Vec::new();
        for (i, &sid) in states.iter().enumerate() {
            for (c, &b) in sample.iter().enumerate() {
                next[i * columns as usize + c] = id[&dfa.next_state(Anchored::No, sid, b)];
            }
            if dfa.is_match(sid) {
                let from = ends.len() as u32;
                ends.extend((0..dfa.match_len(sid)).map(|m| dfa.match_pattern(sid, m).as_u32()));
                spans.push(from..ends.len() as u32);
            }
        }
        Ok(Matcher {
            column,
            next,
            // No pattern is empty, so the start state is no match state: the flag is never set.
            start: id[&start] & !MATCH,
            columns,
            spans,
            ends,
            lens: (0..dfa.patterns_len())
                .map(|p| dfa.pattern_len(PatternID::new_unchecked(p)) as u32)
                .collect(),
            overlap: dfa.max_pattern_len().saturating_sub(1),
        })
    }

    /// Calls `found(pattern, end)` once for every occurrence in `hay`, where `pattern` is the
    /// index of the pattern given to [`Matcher::new`] and `end` the offset just past the
    /// occurrence (it starts at `end - self.len(pattern)`). Order is unspecified.
    pub(crate) fn for_each(&self, hay: &[u8], found: &mut impl FnMut(usize, usize)) {
        let piece = hay.len().div_ceil(LANES);
        if piece < self.overlap + MIN_PIECE {
            self.finish(hay, 0, hay.len(), 0, self.start, found);
            return;
        }
        // Lane k searches bytes begin[k]..end[k] and reports occurrences ending after floor[k].
        let floor: [usize; LANES] = std::array::from_fn(|k| k * piece);
        let begin: [usize; LANES] = std::array::from_fn(|k| floor[k].saturating_sub(self.overlap));
        let end: [usize; LANES] = std::array::from_fn(|k| ((k + 1) * piece).min(hay.len()));
        // The last lane is the shortest: every lane has at least `common` bytes.
        let common = (0..LANES).map(|k| end[k] - begin[k]).min().unwrap_or(0);
        let lanes = begin.map(|b| &hay[b..b + common]);
        let (mut at, mut states) = (0, [self.start; LANES]);
        while at < common {
            (at, states) = self.lanes(lanes, at, states);
            // A lane reached a match state at byte `at - 1`.
            for k in 0..LANES {
                self.report(states[k], begin[k] + at, floor[k], found);
                states[k] &= !MATCH;
            }
        }
        for k in 0..LANES {
            self.finish(hay, begin[k] + common, end[k], floor[k], states[k], found);
        }
    }

    /// Steps every lane from byte `at` until one of them reaches a match state or the lanes end;
    /// returns where it stopped (just past the last byte stepped) and the states. No call in the
    /// loop, so that the states stay in registers. The states given must not be flagged.
    #[inline(never)]
    fn lanes(
        &self,
        [l0, l1, l2, l3]: [&[u8]; LANES],
        mut at: usize,
        [mut s0, mut s1, mut s2, mut s3]: [u32; LANES],
    ) -> (usize, [u32; LANES]) {
        let n = l0.len().min(l1.len()).min(l2.len()).min(l3.len());
        let (l0, l1, l2, l3) = (&l0[..n], &l1[..n], &l2[..n], &l3[..n]);
        let (next, column) = (&*self.next, &self.column);
        let step = |s: u32, b: u8| next[(s + column[usize::from(b)]) as usize];
        while at < n {
            s0 = step(s0, l0[at]);
            s1 = step(s1, l1[at]);
            s2 = step(s2, l2[at]);
            s3 = step(s3, l3[at]);
            at += 1;
            // One branch for all lanes: matches are rare.
            if (s0 | s1 | s2 | s3) & MATCH != 0 {
                break;
            }
        }
        (at, [s0, s1, s2, s3])
    }

    /// The length in bytes of pattern `pattern`.
    pub(crate) fn len(&self, pattern: usize) -> usize {
        self.lens.get(pattern).map_or(0, |&l| l as usize)
    }

    /// One lane on its own, from `state` (not flagged) at `at` to `end`.
    fn finish(
        &self,
        hay: &[u8],
        at: usize,
        end: usize,
        floor: usize,
        mut state: u32,
        found: &mut impl FnMut(usize, usize),
    ) {
        let (next, column) = (&*self.next, &self.column);
        for (i, &b) in hay[at..end].iter().enumerate() {
            state = next[(state + column[usize::from(b)]) as usize];
            if state & MATCH != 0 {
                self.report(state, at + i + 1, floor, found);
                state &= !MATCH;
            }
        }
    }

    #[cold]
    fn report(&self, state: u32, end: usize, floor: usize, found: &mut impl FnMut(usize, usize)) {
        if end <= floor || state & MATCH == 0 {
            return;
        }
        let span = &self.spans[((state & !MATCH) / self.columns) as usize];
        for &pattern in &self.ends[span.start as usize..span.end as usize] {
            found(pattern as usize, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aho_corasick::AhoCorasick;

    /// Every occurrence, as `aho-corasick` itself reports them: the oracle.
    fn expected(patterns: &[String], hay: &[u8]) -> Vec<(usize, usize)> {
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(patterns)
            .unwrap();
        let mut all: Vec<_> = ac
            .find_overlapping_iter(hay)
            .map(|m| (m.pattern().as_usize(), m.end()))
            .collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn lanes_report_every_occurrence_once_wherever_the_cuts_fall() {
        let mut rand = crate::testing::rand(0x9e37_79b9_7f4a_7c15u64);
        let alphabet = b"abAB -\xc3\xa9";
        for round in 0..300 {
            let patterns: Vec<String> = (0..1 + rand(8))
                .map(|_| {
                    (0..1 + rand(if round % 2 == 0 { 4 } else { 40 }))
                        .map(|_| char::from(b"ab -"[rand(4)]))
                        .collect()
                })
                .collect();
            let matcher = Matcher::new(&patterns).unwrap();
            let hay: Vec<u8> = (0..rand(3000))
                .map(|_| alphabet[rand(alphabet.len())])
                .collect();
            let mut found = Vec::new();
            matcher.for_each(&hay, &mut |p, end| found.push((p, end)));
            found.sort_unstable();
            assert_eq!(found, expected(&patterns, &hay), "patterns {patterns:?}");
            for &(p, end) in &found {
                assert!(end >= matcher.len(p));
            }
        }
    }
}

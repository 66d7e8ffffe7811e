//! Helpers for the crate's own tests.

/// A small deterministic generator (xorshift64): `rand(n)` is a number below `n`, the same
/// sequence for the same seed, so that a failing case can be run again.
pub(crate) fn rand(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

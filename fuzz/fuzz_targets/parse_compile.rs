//! Arbitrary bytes as a policy document: parse, compile, round-trip; never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfecx_policy::fuzzing::parse_and_compile(data));

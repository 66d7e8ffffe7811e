//! Arbitrary bytes as a call's arguments and a tool's output under the shipped policies.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| perfecx_policy::fuzzing::evaluate(data));

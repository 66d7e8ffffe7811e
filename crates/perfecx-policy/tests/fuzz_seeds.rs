//! The fuzz targets' seed corpora (`fuzz/corpus/*`), run as ordinary tests through the same entry
#![allow(clippy::expect_used, clippy::panic)]
//! points, so a crash once found and added as a seed stays fixed.

use std::fs;
use std::path::Path;

use perfecx_policy::fuzzing;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("directory entry").path();
            let bytes = fs::read(&path).expect("seed file");
            (path.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

#[test]
fn parse_compile_seeds() {
    for (name, bytes) in seeds("parse_compile") {
        eprintln!("{name}");
        fuzzing::parse_and_compile(&bytes);
    }
}

#[test]
fn evaluate_seeds() {
    for (name, bytes) in seeds("evaluate") {
        eprintln!("{name}");
        fuzzing::evaluate(&bytes);
    }
}

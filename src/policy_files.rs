//! Reading policies from files and directories into a compiled [`PolicySet`].
//!
//! A directory holds policies (`*.yaml`, `*.yml`, `*.json`) and, beside them, policy test suites
//! (`*.test.yaml`), which are not policies. Directories are not searched recursively.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use perfecx_policy::{
    Diagnostic, Diagnostics, MAX_DOCUMENT_BYTES, Policy, PolicySet, parse_policy,
};

/// One policy file that was read and parsed.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    pub path: PathBuf,
    pub policy: String,
    /// FNV-1a 64 of the file's bytes, in hex: tells two versions of a file apart.
    pub hash: String,
}

/// A compiled set and the files it came from.
#[derive(Debug)]
pub struct Loaded {
    pub set: PolicySet,
    pub files: Vec<LoadedFile>,
}

/// Whether `path` names a policy document (not a test suite).
pub fn is_policy_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let is_doc = name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
    is_doc && !is_test_file(path) && !name.starts_with('.')
}

/// Whether `path` names a policy test suite (`*.test.yaml` or `*.test.yml`).
pub fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".test.yaml") || name.ends_with(".test.yml")
}

/// The policy files named by `paths`: files as given, directories by their policy files, sorted.
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries = fs::read_dir(p).map_err(|e| io_error(p, &e))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_policy_file(f) && f.is_file())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads and parses every policy named by `paths`, reporting all problems in all files.
pub fn read_policies(paths: &[PathBuf]) -> Result<Vec<(Policy, LoadedFile)>, Diagnostics> {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for path in policy_files(paths)? {
        match read_one(&path) {
            Ok(p) => policies.push(p),
            Err(d) => problems.extend(d),
        }
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(Diagnostics(problems))
    }
}

/// Reads, parses and compiles every policy named by `paths` into one set.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, Diagnostics> {
    let (policies, files): (Vec<Policy>, Vec<LoadedFile>) =
        read_policies(paths)?.into_iter().unzip();
    let set = PolicySet::compile(policies)?;
    Ok(Loaded { set, files })
}

fn read_one(path: &Path) -> Result<(Policy, LoadedFile), Diagnostics> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if meta.len() > MAX_DOCUMENT_BYTES as u64 {
        return Err(Diagnostic::new(
            path.display().to_string(),
            format!(
                "the file is {} bytes, more than the limit of {MAX_DOCUMENT_BYTES}",
                meta.len()
            ),
        )
        .into());
    }
    let bytes = fs::read(path).map_err(|e| io_error(path, &e))?;
    let source = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|e| {
        Diagnostic::new(
            &source,
            format!(
                "the file is not valid UTF-8 (at byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let policy = parse_policy(&source, &text)?;
    let file = LoadedFile {
        path: path.to_owned(),
        policy: policy.name.clone(),
        hash: fnv1a_hex(text.as_bytes()),
    };
    Ok((policy, file))
}

fn io_error(path: &Path, e: &std::io::Error) -> Diagnostics {
    Diagnostic::new(path.display().to_string(), format!("cannot read: {e}")).into()
}

fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut s = String::with_capacity(16);
    let _ = write!(s, "{h:016x}");
    s
}

//! perfecx: the sidecar that AI agents run their tool calls through, and the `perfecx` command.
//!
//! The policy engine itself is the `perfecx-policy` crate; this crate holds what touches files,
//! sockets and processes.

pub mod demo_tools;
pub mod policy_cmd;
pub mod policy_files;
pub mod sidecar;
pub mod up;

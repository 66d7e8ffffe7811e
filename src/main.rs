//! The `perfecx` command: one binary for the policy tools, the sidecar and the control plane.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use perfecx::policy_cmd::{self, PolicyCommand};

#[derive(Debug, Parser)]
#[command(
    name = "perfecx",
    version,
    about = "Policy-engine sidecar and control plane for AI agents' tool calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, test and explain policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the sidecar that the agent's tool calls pass through.
    Sidecar(perfecx::sidecar::cli::SidecarArgs),
    /// Run the control plane: REST API, storage, rate limits.
    ControlPlane(perfecx_control_plane::ControlPlaneArgs),
    /// Manage the API keys in a control plane's database.
    #[command(subcommand)]
    Keys(perfecx_control_plane::KeysCommand),
    /// Run a control plane (SQLite) and a sidecar (shipped policies, demo tools) in one process.
    Up(perfecx::up::UpArgs),
    /// A demo MCP server over stdio (web_search, calculator, file_reader, ...), for `perfecx up`.
    #[command(hide = true)]
    DemoTools,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Sidecar(args) => perfecx::sidecar::cli::main(args),
        Command::ControlPlane(args) => perfecx_control_plane::control_plane_main(args),
        Command::Keys(cmd) => perfecx_control_plane::keys_main(cmd),
        Command::Up(args) => perfecx::up::main(args),
        Command::DemoTools => match perfecx::demo_tools::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

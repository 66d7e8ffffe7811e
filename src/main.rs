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
    /// A demo MCP server over stdio (web_search, calculator, file_reader, ...), for `perfecx up`.
    #[command(hide = true)]
    DemoTools,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Sidecar(args) => perfecx::sidecar::cli::main(args),
        Command::DemoTools => match perfecx::demo_tools::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// perfecx: a policy-engine sidecar for AI agent tool calls.
#[derive(Parser)]
#[command(name = "perfecx", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar that the agent's tool calls pass through.
    Sidecar(perfecx::sidecar::cli::SidecarArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Sidecar(args) => perfecx::sidecar::cli::main(args),
    }
}

//! `hmm`: the command-line front end of hmm-rs.
//!
//! `hmm demo` tells the seed story on the built-in simulated devices: a buffer migrated to
//! device 0, half of it read back by the CPU, the whole range migrated again (which must
//! cost no device invalidation and no copy for the pages already there), device 1 trying
//! the same range; it prints the notifier events and counters of each step and checks
//! every byte.

#![forbid(unsafe_code)]

mod demo;

use clap::{Parser, Subcommand};

/// hmm-rs: Linux HMM device-memory management as a real userspace system.
#[derive(Debug, Parser)]
#[command(name = "hmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The seed story: migrate to device 0, read half back, migrate again, device 1 tries.
    Demo {
        /// Print one JSON object instead of the narrated walk-through.
        #[arg(long)]
        json: bool,
        /// Pages in the demo buffer.
        #[arg(long, default_value_t = 512)]
        pages: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { json, pages } => demo::run(pages, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hmm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

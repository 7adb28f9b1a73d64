//! `hmm`: the command-line front end of hmm-rs.
//!
//! `hmm demo` walks through the CPU side of an address space — map, fault, write,
//! mprotect, munmap — printing the notifier events each step raised and the counters it
//! cost, and checks every byte it wrote.

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
    /// Walk through map, fault, write, mprotect and munmap, printing events and counters.
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

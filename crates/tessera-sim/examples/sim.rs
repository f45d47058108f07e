//! `tessera sim` without the rest of the binary: the same arguments and
//! output, for timing the simulator with a small release build. It is
//! called as the binary would be (`sim --trace ...` after the program), so
//! `bench/sim.sh` takes it in place of `tessera`:
//!
//! ```sh
//! cargo build --release -p tessera-sim --example sim
//! BIN=target/release/examples/sim bash bench/sim.sh
//! ```

use clap::{Parser, Subcommand};
use tessera_sim::{run_cli, SimArgs};

#[derive(Parser)]
struct Cli {
    /// Print JSON (as `tessera --output json sim`)
    #[arg(short = 'o', long = "output", global = true, value_parser = ["table", "json"], default_value = "table")]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace through the scheduler in virtual time
    Sim(SimArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Sim(args) = cli.command;
    run_cli(args, cli.output == "json")
}

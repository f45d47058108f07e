//! `tessera sim` without the rest of the binary: the same arguments and
//! output, for timing the simulator with a small release build
//! (`cargo run --release -p tessera-sim --example sim -- --trace ... -o json`).

use clap::Parser;
use tessera_sim::{run_cli, SimArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
    /// Print JSON (as `tessera sim --output json`)
    #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    run_cli(cli.sim, cli.output == "json")
}

//! The command-line interface: one sub-module per sub-command, each with its clap arguments and
//! its `run` function.

use clap::{Parser, Subcommand};

mod info;

#[derive(Parser, Debug)]
#[command(
    name = "caml-wgpu",
    version,
    about = "CAML semi-supervised 3D segmentation on WGSL compute"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the GPU adapter, its compute limits and the features the engine uses.
    Info(info::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
    }
}

//! The command-line interface: one sub-module per sub-command, each with its clap arguments and
//! its `run` function.

use clap::{Parser, Subcommand};

mod bench;
mod eval;
mod info;
mod metrics;
mod overlay;
mod predict;
mod prepare_la;
mod synth;
mod train;

#[derive(Parser, Debug)]
#[command(name = "caml-wgpu", version, about = "CAML semi-supervised 3D segmentation on WGSL compute")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure the engine: convolution kernels, a training iteration, or whole-volume prediction.
    Bench(bench::Args),
    /// Segment a dataset split with a model and score it against the labels.
    Eval(Box<eval::Args>),
    /// Print the GPU adapter, its compute limits and the features the engine uses.
    Info(info::Args),
    /// Dice, Jaccard, HD95 and ASD of a predicted mask against a ground truth.
    Metrics(metrics::Args),
    /// Draw axial slices of an image with ground-truth and predicted contours (PNG).
    Overlay(overlay::Args),
    /// Segment NIfTI volumes (a file or a folder) with a trained model.
    Predict(Box<predict::Args>),
    /// Convert the LA challenge data (NRRD or preprocessed HDF5) to the case-folder layout.
    PrepareLa(prepare_la::Args),
    /// Generate synthetic LA-like phantoms with train/test lists.
    Synth(synth::Args),
    /// Train CAML (default: the bundled synthetic data, a preset fitting the adapter).
    Train(Box<train::Args>),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(*a),
        Command::Info(a) => info::run(a),
        Command::Metrics(a) => metrics::run(a),
        Command::Overlay(a) => overlay::run(a),
        Command::Predict(a) => predict::run(*a),
        Command::PrepareLa(a) => prepare_la::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Train(a) => train::run(*a),
    };
    // Pipelines compiled by this command start the next one faster, even after a failure.
    if let Some(g) = crate::gpu::Gpu::opened()
        && let Err(e) = g.save_pipeline_cache()
    {
        eprintln!("warning: {e:#}");
    }
    result
}

/// Makes a panic (an assertion deep in the engine naming a shape or a device limit) print as one
/// `error:` line instead of Rust's report; with RUST_BACKTRACE set the report stays, for debugging.
pub fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown internal error");
        eprintln!("error: {}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
    }));
}

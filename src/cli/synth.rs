use std::path::PathBuf;

use anyhow::Result;

use crate::data::synth::{self, SynthSpec};

/// Generate synthetic LA-like phantoms (case-folder layout with train/test lists).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output dataset folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of cases (80 % train, 20 % test).
    #[arg(long, default_value_t = synth::DEFAULT_CASES)]
    pub cases: usize,
    #[arg(long, default_value_t = synth::DEFAULT_SEED)]
    pub seed: u64,
    /// Volume size X Y Z in voxels.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    pub size: Option<Vec<usize>>,
}

pub fn run(a: Args) -> Result<()> {
    let size = match a.size.as_deref() {
        Some(&[x, y, z]) => [x, y, z],
        _ => synth::DEFAULT_SIZE,
    };
    let spec = SynthSpec::new(a.cases, a.seed, size);
    let t = std::time::Instant::now();
    synth::generate_dataset(&a.out, &spec)?;
    println!(
        "wrote {} cases ({} train, {} test) of {}x{}x{} to {} in {:.1} s",
        spec.cases,
        spec.n_train(),
        spec.cases - spec.n_train(),
        size[0],
        size[1],
        size[2],
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

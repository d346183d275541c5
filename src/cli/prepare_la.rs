use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::data::prepare_la::{self, PrepareReport};

/// Convert the LA challenge data (lgemri.nrrd + laendo.nrrd per case) to the case-folder layout
/// with the reference's preprocessing, or import preprocessed mri_norm2.h5 files.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["raw", "h5"])))]
pub struct Args {
    /// Folder with one sub-folder per case holding lgemri.nrrd and laendo.nrrd.
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Folder with one sub-folder per case holding mri_norm2.h5 (needs the `h5` feature).
    #[arg(long)]
    pub h5: Option<PathBuf>,
    /// Output dataset folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random crop margins.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Folder with train.list and test.list (default: the bundled LA split).
    #[arg(long)]
    pub lists: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let report = match (&a.raw, &a.h5) {
        (Some(raw), _) => prepare_la::prepare_la(raw, &a.out, a.seed, a.lists.as_deref())?,
        (None, Some(h5)) => import(h5, &a)?,
        (None, None) => bail!("give --raw or --h5"),
    };
    for (name, d) in &report.cases {
        println!("{name}: {}x{}x{}", d[0], d[1], d[2]);
    }
    for name in &report.unlisted {
        eprintln!("warning: {name} was converted but is in neither list");
    }
    println!("wrote {} cases to {}", report.cases.len(), a.out.display());
    Ok(())
}

#[cfg(feature = "h5")]
fn import(h5: &std::path::Path, a: &Args) -> Result<PrepareReport> {
    prepare_la::import_h5(h5, &a.out, a.lists.as_deref())
}

#[cfg(not(feature = "h5"))]
fn import(_h5: &std::path::Path, _a: &Args) -> Result<PrepareReport> {
    bail!("this build cannot read HDF5: rebuild with `cargo build --release --features h5`")
}

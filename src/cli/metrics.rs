use std::path::PathBuf;

use anyhow::Result;

use crate::data::Geometry;
use crate::data::nifti_io::read_mask;
use crate::metrics;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Distances in voxels, as the reference reports them.
    Unit,
    /// Distances in millimetres from the ground truth's NIfTI pixdim.
    Header,
}

impl Spacing {
    /// The voxel spacing distances are measured in, for a ground truth of `geometry`.
    pub fn of(self, geometry: &Geometry) -> [f64; 3] {
        match self {
            Spacing::Unit => [1.0; 3],
            Spacing::Header => geometry.spacing.map(f64::from),
        }
    }

    /// The unit of HD95 and ASD.
    pub fn unit(self) -> &'static str {
        match self {
            Spacing::Unit => "voxels",
            Spacing::Header => "mm",
        }
    }
}

/// Dice, Jaccard, HD95 and ASD of a predicted mask against a ground truth (medpy semantics).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Predicted mask (NIfTI; non-zero = foreground).
    #[arg(long)]
    pub pred: PathBuf,
    /// Ground-truth mask (NIfTI; non-zero = foreground).
    #[arg(long)]
    pub gt: PathBuf,
    #[arg(long, value_enum, default_value_t = Spacing::Unit)]
    pub spacing: Spacing,
    /// Print one JSON object {dice, jaccard, hd95, asd}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let pred = read_mask(&a.pred)?;
    let gt = read_mask(&a.gt)?;
    let m = metrics::evaluate(&pred, &gt, a.spacing.of(&gt.geometry))
        .map_err(|e| e.context(format!("comparing {} with {}", a.pred.display(), a.gt.display())))?;
    if m.empty_prediction {
        eprintln!("warning: {} is empty; scored 0 for every metric as the reference does", a.pred.display());
    }
    if a.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        let unit = a.spacing.unit();
        println!("dice     {:.4}", m.dice);
        println!("jaccard  {:.4}", m.jaccard);
        println!("hd95     {:.4} {unit}", m.hd95);
        println!("asd      {:.4} {unit}", m.asd);
    }
    Ok(())
}

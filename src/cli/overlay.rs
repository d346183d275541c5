use std::path::PathBuf;

use anyhow::Result;

use crate::data::nifti_io::{read_image, read_mask};
use crate::overlay::{OverlayOptions, write_overlay};

/// Draw axial slices of an image with ground-truth (green) and predicted (red) contours.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub gt: Option<PathBuf>,
    #[arg(long)]
    pub pred: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub slices: usize,
    #[arg(long, default_value_t = 3)]
    pub zoom: usize,
}

pub fn run(a: Args) -> Result<()> {
    let image = read_image(&a.image)?;
    let gt = a.gt.as_ref().map(read_mask).transpose()?;
    let pred = a.pred.as_ref().map(read_mask).transpose()?;
    let opts = OverlayOptions { slices: a.slices, zoom: a.zoom };
    write_overlay(&a.out, &image, gt.as_ref(), pred.as_ref(), &opts)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

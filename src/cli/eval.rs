use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::data::dataset::Dataset;
use crate::infer::predict::predict;
use crate::metrics::{self, Metrics};
use crate::overlay::{OverlayOptions, write_overlay};

use super::metrics::Spacing;
use super::predict::ModelArgs;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Segment a dataset split and score it: a per-case table with the mean and standard deviation
/// (Dice, Jaccard, HD95, ASD), metrics.csv, summary.json (the settings, every case, mean and
/// standard deviation) and one overlay PNG per case.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder; default: the bundled synthetic set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_enum, default_value_t = Spacing::Unit)]
    pub spacing: Spacing,
    /// Folder for metrics.csv, summary.json and the overlays (default: beside the checkpoint,
    /// eval-<split>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let dir = crate::train::dataset_dir(a.data.as_deref())?;
    let ds = Dataset::open(&dir)?;
    let names = match a.split {
        Split::Train => ds.train.clone(),
        Split::Test => ds.test.clone(),
    };
    if names.is_empty() {
        bail!("{} lists no {:?} cases", dir.display(), a.split);
    }
    let (model, opts) = a.model.load()?;
    let split = format!("{:?}", a.split).to_lowercase();
    let out = a.out.clone().unwrap_or_else(|| {
        a.model.checkpoint.parent().unwrap_or(std::path::Path::new(".")).join(format!("eval-{split}"))
    });
    std::fs::create_dir_all(&out)?;
    crate::fsutil::remove_stale_temps(&out)?;
    let mut csv = String::from("case,dice,jaccard,hd95,asd\n");
    let mut all: Vec<Metrics> = Vec::new();
    let unit = a.spacing.unit();
    println!(
        "{} {split} cases of {} with {}: {}; distances in {unit}",
        names.len(),
        dir.display(),
        a.model.checkpoint.display(),
        opts.describe()
    );
    println!("{:<24} {:>8} {:>8} {:>8} {:>8}", "case", "Dice", "Jaccard", "95HD", "ASD");
    for name in &names {
        let case = ds.load_case(name)?;
        if !opts.normalize
            && let Some(w) = crate::data::dataset::unnormalized_warning(&case.image, &ds.image_path(name)?)
        {
            eprintln!("warning: {w}");
        }
        let (mask, _) = predict(&model, &case.image, &opts)?;
        let m = metrics::evaluate(&mask, &case.label, a.spacing.of(&case.image.geometry))?;
        if m.empty_prediction {
            eprintln!("warning: {name}: empty prediction, scored 0 for every metric as the reference does");
        }
        println!("{name:<24} {:>8.4} {:>8.4} {:>8.2} {:>8.2}", m.dice, m.jaccard, m.hd95, m.asd);
        writeln!(csv, "{name},{},{},{},{}", m.dice, m.jaccard, m.hd95, m.asd)?;
        write_overlay(
            out.join(format!("{name}.png")),
            &case.image,
            Some(&case.label),
            Some(&mask),
            &OverlayOptions::default(),
        )?;
        all.push(m);
    }
    let mean = metrics::mean_metrics(&all).expect("at least one case");
    let std = metrics::std_metrics(&all).expect("at least one case");
    for (row, m) in [("mean", &mean), ("std", &std)] {
        println!("{row:<24} {:>8.4} {:>8.4} {:>8.2} {:>8.2}", m.dice, m.jaccard, m.hd95, m.asd);
    }
    writeln!(csv, "mean,{},{},{},{}", mean.dice, mean.jaccard, mean.hd95, mean.asd)?;
    crate::fsutil::write_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
    let summary = Summary {
        checkpoint: a.model.checkpoint.display().to_string(),
        data: dir.display().to_string(),
        split: &split,
        settings: opts.describe(),
        distances: unit,
        cases: names
            .iter()
            .zip(&all)
            .map(|(case, m)| CaseRow { case, empty_prediction: m.empty_prediction, metrics: *m })
            .collect(),
        mean,
        std,
        empty_predictions: all.iter().filter(|m| m.empty_prediction).count(),
    };
    let json = serde_json::to_string_pretty(&summary)? + "\n";
    crate::fsutil::write_atomic(&out.join("summary.json"), json.as_bytes())?;
    println!("metrics.csv, summary.json and overlays in {}", out.display());
    Ok(())
}

/// summary.json: what was scored and how, every case, and the mean and standard deviation.
#[derive(serde::Serialize)]
struct Summary<'a> {
    checkpoint: String,
    data: String,
    split: &'a str,
    settings: String,
    /// "voxels" or "mm" (HD95 and ASD).
    distances: &'a str,
    cases: Vec<CaseRow<'a>>,
    mean: Metrics,
    std: Metrics,
    empty_predictions: usize,
}

#[derive(serde::Serialize)]
struct CaseRow<'a> {
    case: &'a str,
    #[serde(flatten)]
    metrics: Metrics,
    empty_prediction: bool,
}

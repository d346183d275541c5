use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::config::{LrSchedule, Method, Precision, Preset, TrainConfig};
use crate::gpu::Gpu;

/// Train CAML. With no arguments: the bundled synthetic data, with the preset that fits the
/// adapter (paper on a GPU, small on a software device).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder (case folders or nnU-Net layout); default: the bundled synthetic set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// A TOML file of configuration keys, applied over the preset (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Labeled cases: the first N of the train list.
    #[arg(long)]
    pub labeled: Option<usize>,
    /// Training iterations (15,000 in the paper).
    #[arg(long)]
    pub iters: Option<u64>,
    /// Patch size X Y Z (each a multiple of 16).
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    pub patch: Option<Vec<usize>>,
    /// Base width F of the network (16 in the paper).
    #[arg(long)]
    pub width: Option<usize>,
    /// Samples per batch (4 in the paper).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Labeled samples per batch (2 in the paper).
    #[arg(long)]
    pub labeled_bs: Option<usize>,
    /// SGD learning rate (constant; 0.01 in the paper).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Learning-rate schedule (constant in the paper).
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// Storage of the activations kept for the backward pass (f16: about half the memory).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Seed of initialization, sampling, augmentation and dropout (1337 in the paper).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Ramp length R (in steps of 150 iterations in the paper preset).
    #[arg(long)]
    pub rampup: Option<f64>,
    /// Memory-bank features drawn per class each iteration (256 in the paper).
    #[arg(long)]
    pub memory_num: Option<usize>,
    /// Most confident unlabeled voxels kept per class for the omni-correlation (12,800).
    #[arg(long)]
    pub num_filtered: Option<usize>,
    /// Sharpening temperature T of the consistency targets.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Dropout3d probability after block_five and block_nine (0.5 in the reference; the small
    /// preset uses 0).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Detach the sharpened consistency targets (the reference does not; the small preset
    /// does, `detach_targets = false` in a --config file undoes it).
    #[arg(long)]
    pub detach_targets: bool,
    /// Flatten the auxiliary embeddings channels-last for the memory bank (the reference does not).
    #[arg(long)]
    pub fix_memory_view: bool,
    /// Random contrast, brightness, gamma and noise on each training patch (true or false; the
    /// reference has none, the small preset uses it).
    #[arg(long, value_name = "BOOL")]
    pub intensity_aug: Option<bool>,
    /// Validation Dice on the test split every N iterations (0: never).
    #[arg(long)]
    pub val_every: Option<u64>,
    /// A checkpoint every N iterations (the final one is always written).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Run folder (default: runs/<method>-<labeled>l-s<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Z-normalise each image over its whole volume when it is read, as the LA preprocessing
    /// does: for images not prepared by prepare-la or synth (raw scanner intensities).
    /// predict and eval then do the same with the model.
    #[arg(long)]
    pub normalize: bool,
    /// Continue the run saved in --out from its last complete checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start over in an --out folder that holds an earlier run, replacing its files (without this,
    /// such a folder is refused).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    let gpu = Gpu::init()?;
    let preset = match a.preset {
        Some(p) => {
            println!("preset: {p:?} (chosen with --preset)");
            p
        }
        None if gpu.is_software() => {
            println!(
                "preset: small (adapter '{}' is a software device; the paper preset would take days)",
                gpu.info.name
            );
            Preset::Small
        }
        None => {
            println!("preset: paper (adapter '{}' is a GPU)", gpu.info.name);
            Preset::Paper
        }
    };
    let mut cfg = TrainConfig::preset(preset);
    if let Some(f) = &a.config {
        cfg = cfg.merge_file(f)?;
    }
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = a.$field.clone() { cfg.$field = v; })* };
    }
    set!(
        method,
        labeled,
        iters,
        width,
        batch,
        labeled_bs,
        lr,
        lr_schedule,
        seed,
        memory_num,
        num_filtered,
        temperature,
        dropout,
        intensity_aug
    );
    set!(val_every, checkpoint_every, precision);
    if a.data.is_some() {
        cfg.data = a.data.clone();
    }
    if let Some(r) = a.rampup {
        cfg.rampup = Some(r);
    }
    if let Some(p) = &a.patch {
        cfg.patch = [p[0], p[1], p[2]];
    }
    cfg.detach_targets |= a.detach_targets;
    cfg.fix_memory_view |= a.fix_memory_view;
    cfg.normalize |= a.normalize;
    cfg.validate()?;
    let out = a.out.clone().unwrap_or_else(|| {
        let m = format!("{:?}", cfg.method).to_lowercase();
        PathBuf::from("runs").join(format!("{m}-{}l-s{}", cfg.labeled, cfg.seed))
    });
    if !a.resume
        && !a.overwrite
        && let Some(earlier) = crate::train::earlier_run(&out)
    {
        bail!(
            "{} holds an earlier run ({earlier}): --resume continues it, --overwrite starts it over, \
             --out names another folder",
            out.display()
        );
    }
    println!(
        "training {:?}: width {}, patch {:?}, batch {} ({} labeled), {} labeled cases, {} iterations -> {}",
        cfg.method,
        cfg.width,
        cfg.patch,
        cfg.batch,
        cfg.labeled_bs,
        cfg.labeled,
        cfg.iters,
        out.display()
    );
    let last = crate::train::train(&cfg, &out, a.resume)?;
    println!(
        "done: iteration {}, loss {:.4} (loss_s {:.4}, loss_c {:.4}, loss_o {:.4}); weights in {}",
        last.iter,
        last.loss,
        last.loss_s,
        last.loss_c,
        last.loss_o,
        out.join(crate::train::FINAL_MODEL).display()
    );
    Ok(())
}

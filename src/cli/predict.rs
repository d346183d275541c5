use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use crate::caml::model::Caml;
use crate::config::{Preset, TrainConfig};
use crate::data::nifti_io::{read_image, write_image, write_mask};
use crate::gpu::Gpu;
use crate::infer::predict::{PredictOptions, predict};

/// Options shared by predict and eval: the model file, and how to rebuild and run it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model weights (safetensors with the reference's state_dict names).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Patch X Y Z; default: the checkpoint's saved configuration, else the paper's 112 112 80.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    pub patch: Option<Vec<usize>>,
    /// Base width F; default: the checkpoint's, else 16.
    #[arg(long)]
    pub width: Option<usize>,
    /// Window stride X Y Z; default: 18 18 4 for the paper patch, half the patch otherwise.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    pub stride: Option<Vec<usize>>,
    /// Blend windows with a Gaussian importance map (sigma = patch / 8), as nnU-Net and MONAI do.
    #[arg(long)]
    pub gaussian: bool,
    /// Average the foreground probabilities of both decoders.
    #[arg(long)]
    pub average_decoders: bool,
    /// Test-time mirroring: also run every window flipped along these axes (any of x, y, z) and
    /// average the probabilities over every combination of flips: `xy` takes 4 passes (the
    /// training augmentation flips X and Y), `xyz` 8 (as nnU-Net does).
    #[arg(long, value_name = "AXES", value_parser = parse_mirror_axes)]
    pub mirror: Option<[bool; 3]>,
    /// Keep only the largest connected component.
    #[arg(long)]
    pub largest_component: bool,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 2)]
    pub window_batch: usize,
    /// Z-normalise each image over its whole volume first, as the LA preprocessing does (for
    /// raw scans); always done for a model trained with --normalize.
    #[arg(long)]
    pub normalize: bool,
}

/// The axes of `--mirror`: letters x, y and z, each at most once.
fn parse_mirror_axes(text: &str) -> Result<[bool; 3], String> {
    let mut axes = [false; 3];
    for c in text.chars() {
        let a = match c.to_ascii_lowercase() {
            'x' => 0,
            'y' => 1,
            'z' => 2,
            _ => return Err(format!("'{c}' is not an axis: give any of x, y and z, such as xy")),
        };
        if axes[a] {
            return Err(format!("axis {c} is given twice"));
        }
        axes[a] = true;
    }
    if axes == [false; 3] {
        return Err("give at least one axis (x, y or z), such as xy".into());
    }
    Ok(axes)
}

impl ModelArgs {
    /// The model with its weights, and the options to run it.
    pub fn load(&self) -> Result<(Caml, PredictOptions)> {
        let gpu = Gpu::init()?;
        let mut fallback = TrainConfig::preset(Preset::Paper);
        if let Some(w) = self.width {
            fallback.width = w;
        }
        let (model, mut cfg) = crate::train::load_model(&self.checkpoint, &fallback)?;
        if let Some(p) = &self.patch {
            cfg.patch = [p[0], p[1], p[2]];
        }
        let mut window = crate::train::window_options(cfg.patch);
        if let Some(s) = &self.stride {
            if s.contains(&0) {
                bail!("--stride values must be positive");
            }
            window.stride = [s[0], s[1], s[2]];
        }
        window.gaussian = self.gaussian;
        window.batch = self.window_batch.max(1);
        cfg.validate()?;
        let limits = (gpu.limits.max_buffer_size, gpu.max_binding());
        crate::train::preflight(&cfg, window.batch, limits, "--window-batch")?;
        let opts = PredictOptions {
            window,
            normalize: self.normalize || cfg.normalize,
            average_decoders: self.average_decoders,
            mirror: self.mirror.unwrap_or([false; 3]),
            largest_component: self.largest_component,
        };
        Ok((model, opts))
    }
}

/// Segment NIfTI volumes: a file or every .nii/.nii.gz in a folder; outputs keep the input names
/// and geometry.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A NIfTI file, or a folder of them.
    #[arg(short, long)]
    pub input: PathBuf,
    /// Output file (for one input) or folder.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also write the foreground probability map (<name>_prob.nii.gz).
    #[arg(long)]
    pub save_probabilities: bool,
    /// Stop at the first case that fails instead of reporting it and going on.
    #[arg(long)]
    pub fail_fast: bool,
}

fn strip_nifti(name: &str) -> &str {
    name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii")).unwrap_or(name)
}

fn nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            p.is_file() && (n.ends_with(".nii") || n.ends_with(".nii.gz"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The probability map written beside the mask `out` with `--save-probabilities`.
fn probability_path(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{}_prob.nii.gz", strip_nifti(&name)))
}

/// A path as the file system resolves it, for one that may not exist yet: its folder resolved.
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => p.to_path_buf(),
    }
}

/// The inputs, their outputs and the output folder, settled before the model loads: every NIfTI
/// file of an input folder into the output folder under its own name; one input file into the
/// output file, or under its own name into the output when that names a folder (one that exists,
/// or written with a trailing separator). Refused: an output folder that is the input folder, a
/// file output without a NIfTI extension, and any output (mask or probability map) that would
/// overwrite an input. Then the output folder is created.
fn plan_outputs(
    input: &Path,
    output: &Path,
    probabilities: bool,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>, PathBuf)> {
    let into_folder = |files: &[PathBuf], dir: &Path| -> Vec<PathBuf> {
        let name = |f: &PathBuf| strip_nifti(&f.file_name().unwrap().to_string_lossy()).to_string();
        files.iter().map(|f| dir.join(format!("{}.nii.gz", name(f)))).collect()
    };
    ensure!(input.exists(), "{}: no such file or folder", input.display());
    let (inputs, outputs, dir) = if input.is_dir() {
        let files = nifti_files(input)?;
        if files.is_empty() {
            bail!("{} holds no .nii or .nii.gz files", input.display());
        }
        if resolved(output) == resolved(input) {
            bail!(
                "the output folder {} is the input folder: write the masks to another folder",
                output.display()
            );
        }
        let outs = into_folder(&files, output);
        (files, outs, output.to_path_buf())
    } else {
        let text = output.to_string_lossy();
        let files = vec![input.to_path_buf()];
        if output.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
            let outs = into_folder(&files, output);
            (files, outs, output.to_path_buf())
        } else {
            if !(text.ends_with(".nii.gz") || text.ends_with(".nii")) {
                bail!("{}: a NIfTI output must end in .nii or .nii.gz, or name a folder", output.display());
            }
            let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (files, vec![output.to_path_buf()], dir.to_path_buf())
        }
    };
    let taken: Vec<PathBuf> = inputs.iter().map(|i| resolved(i)).collect();
    for out in &outputs {
        let written = [Some(out.clone()), probabilities.then(|| probability_path(out))];
        for w in written.into_iter().flatten() {
            if taken.contains(&resolved(&w)) {
                bail!("{} is an input: the output would overwrite it; choose another output", w.display());
            }
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok((inputs, outputs, dir))
}

pub fn run(a: Args) -> Result<()> {
    let (inputs, outputs, out_dir) = plan_outputs(&a.input, &a.output, a.save_probabilities)?;
    // Files a killed earlier run was writing into the same folder.
    crate::fsutil::remove_stale_temps(&out_dir)?;
    let (model, opts) = a.model.load()?;
    println!(
        "segmenting {} volume(s) with {}: {}",
        inputs.len(),
        a.model.checkpoint.display(),
        opts.describe()
    );
    let bar = indicatif::ProgressBar::new(inputs.len() as u64);
    let mut failed = Vec::new();
    for (inp, out) in inputs.iter().zip(&outputs) {
        bar.set_message(inp.display().to_string());
        let result = (|| -> Result<()> {
            let image = read_image(inp)?;
            crate::data::dataset::check_finite(&image, inp)?;
            if !opts.normalize
                && let Some(w) = crate::data::dataset::unnormalized_warning(&image, inp)
            {
                bar.suspend(|| eprintln!("warning: {w}"));
            }
            let (mask, prob) = predict(&model, &image, &opts)?;
            write_mask(out, &mask)?;
            if a.save_probabilities {
                write_image(probability_path(out), &prob)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let e = e.context(format!("case {}", inp.display()));
            if a.fail_fast {
                return Err(e);
            }
            // On stderr whether or not the bar is drawn (it is hidden when stderr is not a terminal).
            bar.suspend(|| eprintln!("error: {e:#} (skipped)"));
            failed.push(inp.clone());
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} of {} volumes segmented into {}",
        inputs.len() - failed.len(),
        inputs.len(),
        a.output.display()
    );
    if !failed.is_empty() {
        bail!(
            "{} case(s) failed: {}",
            failed.len(),
            failed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

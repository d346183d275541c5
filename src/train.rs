//! `caml-wgpu train`: the run folder, the loop with a background batch loader, logging,
//! validation, checkpoints and resumption.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::caml::model::Caml;
use crate::caml::step::{StepLog, TrainState, flush, rehearse, train_step};
use crate::checkpoint::{self, Entry, StateDict};
use crate::config::{Method, TrainConfig};
use crate::data::dataset::{Case, Dataset};
use crate::data::sampler::{Batch, Sampler, SamplerState};
use crate::infer::predict::{PredictOptions, predict};
use crate::infer::window::WindowOptions;
use crate::metrics;
use crate::rng::{Rng, RngState};
use crate::tensor::Tensor;

/// The file a run folder keeps its latest complete state in (weights, optimizer, memory bank,
/// sampler and random streams): `--resume` starts from it.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The final weights alone, loadable by `predict` and by PyTorch.
pub const FINAL_MODEL: &str = "model_final.safetensors";

/// Resolves the dataset folder: the given one, or the bundled synthetic set (generated on first
/// use).
pub fn dataset_dir(data: Option<&Path>) -> Result<PathBuf> {
    match data {
        Some(d) => Ok(d.to_path_buf()),
        None => crate::data::synth::ensure_default_dataset(Path::new("data").join("synth")),
    }
}

/// Builds the model a configuration describes (CMA only for the full method).
pub fn build_model(cfg: &TrainConfig) -> Caml {
    let mut model = Caml::new(cfg.width, cfg.embed, cfg.method == Method::Caml, cfg.seed);
    model.dropout = cfg.dropout;
    model
}

/// A lower bound on the values in a network's state_dict: the three 3x3x3 convolutions of each
/// encoder's deepest block (16F to 16F channels) and the E x E layers of the four heads.
pub fn min_model_values(width: usize, embed: usize) -> u64 {
    let deep = 16u64.saturating_mul(width as u64);
    let e = embed as u64;
    (2 * 3 * 27u64)
        .saturating_mul(deep.saturating_mul(deep))
        .saturating_add(4u64.saturating_mul(e.saturating_mul(e)))
}

/// Checks, before any data is read or memory allocated, that the largest tensors of a
/// configuration fit the adapter, whose limits are `(max_buffer, max_binding)` bytes: the
/// weights of the deepest convolution [16F, 16F, 3, 3, 3] and of the heads [E, max(F, E)], and
/// one sample's activations [F, X, Y, Z], each bound whole by a kernel; the activations of a
/// batch [N, F, X, Y, Z] in one buffer. `batch_flag` names the option that sets N.
pub fn preflight(cfg: &TrainConfig, batch: usize, limits: (u64, u64), batch_flag: &str) -> Result<()> {
    let (max_buffer, max_binding) = limits;
    let [x, y, z] = cfg.patch;
    let (f, e) = (cfg.width, cfg.embed);
    let checks: [(&str, Vec<usize>, u64, &str, String); 4] = [
        (
            "the deepest convolution's weights",
            vec![f.saturating_mul(16), f.saturating_mul(16), 3, 3, 3],
            max_binding,
            "binding",
            "--width".into(),
        ),
        ("the heads' weights", vec![e, f.max(e)], max_binding, "binding", "embed or --width".into()),
        ("one sample's activations", vec![f, x, y, z], max_binding, "binding", "--patch".into()),
        (
            "a batch's activations",
            vec![batch, f, x, y, z],
            max_buffer,
            "buffer",
            format!("--patch or {batch_flag}"),
        ),
    ];
    for (what, shape, limit, kind, knob) in checks {
        let limit_text = match kind {
            "binding" => format!("this adapter's limit of {limit} bytes per storage binding"),
            _ => format!("this adapter's maximum buffer size of {limit} bytes"),
        };
        match shape.iter().try_fold(4u64, |a, &d| a.checked_mul(d as u64)) {
            Some(b) if b <= limit => {}
            Some(b) => {
                bail!("{what} of shape {shape:?} ({b} bytes) exceed {limit_text}; use a smaller {knob}")
            }
            None => bail!("{what} of shape {shape:?} exceed {limit_text}; use a smaller {knob}"),
        }
    }
    Ok(())
}

/// The metadata a model file carries so that predict and eval rebuild the same network.
pub fn model_metadata(cfg: &TrainConfig) -> HashMap<String, String> {
    HashMap::from([("format".into(), "caml-wgpu".into()), ("config".into(), cfg.to_toml())])
}

/// Sliding-window settings for a configuration: the reference's strides for the paper patch,
/// half-patch strides otherwise.
pub fn window_options(patch: [usize; 3]) -> WindowOptions {
    let stride = if patch == crate::infer::window::REFERENCE_PATCH {
        crate::infer::window::REFERENCE_STRIDE
    } else {
        patch.map(|p| (p / 2).max(1))
    };
    WindowOptions { patch, stride, gaussian: false, batch: 2 }
}

/// Mean Dice of the model on `cases`, and how many of its predictions are empty.
pub fn mean_dice(model: &Caml, cases: &[Case], patch: [usize; 3]) -> Result<Validation> {
    // The cases were read as the model takes them (z-normalised already where it needs that).
    let opts = PredictOptions {
        window: window_options(patch),
        normalize: false,
        average_decoders: false,
        mirror: [false; 3],
        largest_component: false,
    };
    let mut v = Validation { dice: 0.0, cases: cases.len(), empty: 0 };
    for c in cases {
        let (mask, _) = predict(model, &c.image, &opts)?;
        v.dice += metrics::dice(mask.data(), c.label.data());
        v.empty += mask.data().iter().all(|&m| m == 0) as usize;
    }
    v.dice /= cases.len().max(1) as f64;
    Ok(v)
}

/// A validation pass: the mean Dice over the test cases and how many predictions held no
/// foreground at all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Validation {
    pub dice: f64,
    pub cases: usize,
    pub empty: usize,
}

impl Validation {
    /// The progress line of iteration `iter`, saying so when the model predicted no foreground
    /// on some cases: a model that has collapsed to background scores 0 on every case.
    pub fn line(&self, iter: u64) -> String {
        let mut s =
            format!("iteration {iter}: validation Dice {:.4} on {} test cases", self.dice, self.cases);
        if self.empty > 0 {
            s += &format!(
                " (warning: no foreground predicted on {} of {} cases{})",
                self.empty,
                self.cases,
                if self.empty == self.cases { ": the model has collapsed to background" } else { "" }
            );
        }
        s
    }
}

/// The model's weights and BatchNorm statistics under the reference's names, as a checkpoint
/// holds them (`num_batches_tracked` as I64).
pub fn model_dict(model: &Caml) -> StateDict {
    let (params, buffers) = model.named();
    params.iter().chain(&buffers).map(|(k, t)| (k.clone(), tensor_entry(t))).collect()
}

fn tensor_entry(t: &Tensor) -> Entry {
    match t.dtype() {
        crate::DType::F32 => Entry::f32(t.shape(), t.to_vec()),
        crate::DType::U32 => Entry::i64(t.shape(), t.to_u32().into_iter().map(i64::from).collect()),
    }
}

fn load_entry(t: &Tensor, e: &Entry, name: &str, path: &Path) -> Result<()> {
    ensure!(
        e.shape == t.shape(),
        "{}: {name} has shape {:?}, expected {:?}",
        path.display(),
        e.shape,
        t.shape()
    );
    let bytes: Vec<u8> = match (t.dtype(), &e.data) {
        (crate::DType::F32, checkpoint::Data::F32(v)) => bytemuck::cast_slice(v).to_vec(),
        (crate::DType::U32, checkpoint::Data::I64(v)) => {
            v.iter().flat_map(|&x| (x.clamp(0, u32::MAX as i64) as u32).to_le_bytes()).collect()
        }
        _ => bail!("{}: {name} has the wrong element type", path.display()),
    };
    if let Some(bad) = e.as_f32().and_then(|v| v.iter().position(|x| !x.is_finite())) {
        bail!("{}: {name} holds a non-finite value at entry {bad}", path.display());
    }
    crate::gpu::gpu().upload(t.buffer(), 0, &bytes);
    Ok(())
}

/// Loads weights (and BatchNorm statistics) into the model, checking every name and shape.
pub fn load_model_weights(model: &Caml, dict: &StateDict, path: &Path) -> Result<()> {
    let (params, buffers) = model.named();
    let all: Vec<(String, Tensor)> = params.into_iter().chain(buffers).collect();
    let expected: Vec<(String, Vec<usize>)> =
        all.iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect();
    let model_keys: StateDict =
        dict.iter().filter(|(k, _)| !k.contains('/')).map(|(k, v)| (k.clone(), v.clone())).collect();
    checkpoint::check_against(path, &model_keys, &expected)?;
    for (k, t) in &all {
        load_entry(t, &dict[k], k, path)?;
    }
    Ok(())
}

/// Reads a model file: the network it describes (from its saved configuration, else `fallback`)
/// with its weights.
pub fn load_model(path: &Path, fallback: &TrainConfig) -> Result<(Caml, TrainConfig)> {
    let (dict, meta) = checkpoint::load(path)?;
    let cfg = match meta.get("config") {
        Some(text) => {
            let cfg = toml::from_str::<TrainConfig>(text)
                .with_context(|| format!("{}: unreadable saved configuration", path.display()))?;
            cfg.validate().with_context(|| format!("{}: invalid saved configuration", path.display()))?;
            cfg
        }
        // A file trained elsewhere carries no configuration: it has CMA weights when it has the keys.
        None => {
            let cma = dict.keys().any(|k| k.contains("intra_attention"));
            TrainConfig { method: if cma { Method::Caml } else { Method::Mutual }, ..fallback.clone() }
        }
    };
    // The network is built before its names and shapes can be compared: a file too small for
    // the width it claims is rejected first, so that a corrupt width allocates nothing.
    let held: u64 = dict
        .iter()
        .filter(|(k, _)| !k.contains('/'))
        .map(|(_, e)| e.shape.iter().map(|&d| d as u64).product::<u64>())
        .fold(0, u64::saturating_add);
    let need = min_model_values(cfg.width, cfg.embed);
    ensure!(
        held >= need,
        "{} holds {held} weights, fewer than the {need} at least that a network of width {} and \
         embedding {} has",
        path.display(),
        cfg.width,
        cfg.embed
    );
    let model = build_model(&cfg);
    load_model_weights(&model, &dict, path)?;
    Ok((model, cfg))
}

/// Writes the complete training state in one file, atomically.
pub fn save_checkpoint(dir: &Path, st: &TrainState, cfg: &TrainConfig, sampler: &SamplerState) -> Result<()> {
    anyhow::ensure!(
        st.pending.is_none(),
        "iteration {}'s loss values are unread: flush them before saving a checkpoint",
        st.iter
    );
    let mut dict = model_dict(&st.model);
    let names: Vec<String> = st.model.named().0.into_iter().map(|(k, _)| k).collect();
    for (k, m) in names.iter().zip(&st.opt.momentum) {
        dict.insert(format!("optim/{k}"), tensor_entry(m));
    }
    let mut counts = Vec::new();
    for i in 0..st.bank.cases() {
        if let Some((rows, c)) = st.bank.entry(i) {
            dict.insert(format!("bank/{i}"), tensor_entry(&rows));
            counts.push((i, c));
        }
    }
    let mut meta = model_metadata(cfg);
    meta.insert("iteration".into(), st.iter.to_string());
    meta.insert("sampler".into(), serde_json::to_string(sampler)?);
    meta.insert("rng".into(), serde_json::to_string(&st.rng.state())?);
    meta.insert("bank".into(), serde_json::to_string(&counts)?);
    checkpoint::save(&dir.join(CHECKPOINT), &dict, &meta)
}

/// Restores the training state saved in `dir` (weights, momentum, memory bank, random streams)
/// into `st` and returns the sampler positioned where it stood. Everything in the file is
/// checked against the configuration and the `n_train` training cases before any of it is used,
/// so that a corrupt or foreign checkpoint is an error naming it.
pub fn restore_checkpoint(
    dir: &Path,
    st: &mut TrainState,
    cfg: &TrainConfig,
    n_train: usize,
) -> Result<Sampler> {
    let path = dir.join(CHECKPOINT);
    let (dict, meta) = checkpoint::load(&path)?;
    let (params, buffers) = st.model.named();
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    for (k, t) in params.iter().chain(&buffers) {
        expected.push((k.clone(), t.shape().to_vec()));
    }
    for (k, t) in &params {
        expected.push((format!("optim/{k}"), t.shape().to_vec()));
    }
    let at = |what: &str| format!("{}: {what}", path.display());
    let get = |k: &str| meta.get(k).with_context(|| at(&format!("no '{k}' entry")));
    let counts: Vec<(usize, [usize; 2])> =
        serde_json::from_str(get("bank")?).with_context(|| at("unreadable memory-bank counts"))?;
    let labeled = st.bank.cases();
    let mut seen = vec![false; labeled];
    for &(i, c) in &counts {
        ensure!(i < labeled, "{}", at(&format!("memory-bank entry {i} of {labeled} labeled cases")));
        ensure!(!std::mem::replace(&mut seen[i], true), "{}", at(&format!("memory-bank entry {i} twice")));
        let rows = c[0].checked_add(c[1]).with_context(|| at(&format!("memory-bank counts {c:?}")))?;
        let room = st.bank.capacity();
        ensure!(
            rows <= room,
            "{}",
            at(&format!("memory-bank entry {i} holds {rows} rows, more than the {room} voxels of a patch"))
        );
        expected.push((format!("bank/{i}"), vec![rows, cfg.embed]));
    }
    // Bank tensors the counts do not list are reported as unexpected with the rest.
    checkpoint::check_against(&path, &dict, &expected)?;
    for (k, t) in params.iter().chain(&buffers) {
        let want_f32 = t.dtype() == crate::DType::F32;
        ensure!(dict[k].as_f32().is_some() == want_f32, "{}", at(&format!("{k} has the wrong element type")));
    }
    if let Some((k, _)) = dict.iter().find(|(k, e)| k.contains('/') && e.as_f32().is_none()) {
        bail!("{}", at(&format!("{k} is not a floating-point tensor")));
    }
    let iter: u64 = get("iteration")?.parse().with_context(|| at("bad iteration"))?;
    let rng = serde_json::from_str::<RngState>(get("rng")?).with_context(|| at("unreadable random state"))?;
    let saved: SamplerState =
        serde_json::from_str(get("sampler")?).with_context(|| at("unreadable sampler state"))?;
    let unlabeled_bs =
        if cfg.method == Method::LabeledOnly { 0 } else { cfg.batch.saturating_sub(cfg.labeled_bs) }.max(1);
    ensure!(
        (saved.n_train, saved.labelnum, saved.labeled_bs, saved.unlabeled_bs)
            == (n_train, cfg.labeled, cfg.labeled_bs, unlabeled_bs),
        "{}",
        at(&format!(
            "the sampler was saved for {} training cases ({} labeled) in batches of {} + {}, this run \
             has {n_train} ({}) in batches of {} + {unlabeled_bs}",
            saved.n_train, saved.labelnum, saved.labeled_bs, saved.unlabeled_bs, cfg.labeled, cfg.labeled_bs
        ))
    );
    let sampler = Sampler::from_state(saved).with_context(|| at("bad sampler state"))?;
    for (k, e) in &dict {
        if let Some(bad) = e.as_f32().and_then(|v| v.iter().position(|x| !x.is_finite())) {
            bail!("{}", at(&format!("{k} holds a non-finite value at entry {bad}")));
        }
    }
    // The run goes on as it was configured (a resume may extend it, or move its data).
    if let Some(text) = meta.get("config") {
        let changed = cfg.resume_differences(text).with_context(|| at("its configuration"))?;
        ensure!(
            changed.is_empty(),
            "{}",
            at(&format!(
                "the run was saved with other settings: {}; resume it with its own (--config {})",
                changed.join(", "),
                dir.join("config.toml").display()
            ))
        );
    }
    // Checked: now load.
    load_model_weights(&st.model, &dict, &path)?;
    for ((k, _), m) in params.iter().zip(&st.opt.momentum) {
        let key = format!("optim/{k}");
        load_entry(m, &dict[&key], &key, &path)?;
    }
    for (i, c) in counts {
        let key = format!("bank/{i}");
        let e = &dict[&key];
        let v = e.as_f32().expect("bank tensors were checked to be f32");
        st.bank.update(i, Tensor::from_vec(v, &e.shape), c);
    }
    st.iter = iter;
    st.rng = Rng::from_state(rng);
    Ok(sampler)
}

/// Batches prepared on a background thread, each with the sampler state after it, so that a
/// checkpoint records exactly where the stream stands.
fn spawn_loader(
    mut sampler: Sampler,
    cases: Vec<Case>,
    patch: [usize; 3],
    intensity: bool,
    count: u64,
) -> Receiver<Result<(Batch, SamplerState)>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        for _ in 0..count {
            let item = sampler.next_batch(&cases, patch, intensity).map(|b| (b, sampler.state()));
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                break;
            }
        }
    });
    rx
}

const LOG_HEADER: &str = "iter,loss,loss_s,loss_c,loss_o,lambda_c,lambda_o,lr,seconds";
const LOG: &str = "log.csv";
const VALIDATION: &str = "validation.csv";
/// The files `train` writes into a run folder.
const RUN_FILES: [&str; 6] = ["config.toml", LOG, VALIDATION, "loss.png", CHECKPOINT, FINAL_MODEL];

/// What `out` holds of an earlier training run: its files that `train` writes, and the last
/// iteration its log records; None when it holds none of them.
pub fn earlier_run(out: &Path) -> Option<String> {
    let files: Vec<&str> = RUN_FILES.iter().copied().filter(|f| out.join(f).is_file()).collect();
    if files.is_empty() {
        return None;
    }
    let logged = last_logged(&out.join(LOG)).ok().flatten();
    let reached = logged.map_or(String::new(), |l| format!(", logged to iteration {}", l.iter));
    Some(format!("{}{reached}", files.join(", ")))
}

/// The last iteration that the log at `path` records; None when it records none.
fn last_logged(path: &Path) -> Result<Option<StepLog>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Some(line) = text.lines().skip(1).filter(|l| !l.trim().is_empty()).last() else { return Ok(None) };
    let bad = || format!("{}: unreadable line '{line}'", path.display());
    let v: Vec<&str> = line.split(',').collect();
    ensure!(v.len() >= 7, "{}", bad());
    let f = |i: usize| v[i].trim().parse::<f64>().with_context(bad);
    Ok(Some(StepLog {
        iter: v[0].trim().parse().with_context(bad)?,
        loss: f(1)? as f32,
        loss_s: f(2)? as f32,
        loss_c: f(3)? as f32,
        loss_o: f(4)? as f32,
        lambda_c: f(5)?,
        lambda_o: f(6)?,
    }))
}

/// Trains as `cfg` says, into `out`; with `resume`, continues the run saved there, otherwise first
/// removes the files of an earlier run there ([`earlier_run`]; `caml-wgpu train` refuses such a
/// folder unless told to overwrite it).
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool) -> Result<StepLog> {
    cfg.validate()?;
    let gpu = crate::gpu::Gpu::init()?;
    preflight(cfg, cfg.batch, (gpu.limits.max_buffer_size, gpu.max_binding()), "--batch")?;
    let data_dir = dataset_dir(cfg.data.as_deref())?;
    let ds = Dataset::open(&data_dir)?;
    ensure!(
        cfg.labeled <= ds.train.len(),
        "{} labeled cases requested but {} lists only {} training cases",
        cfg.labeled,
        data_dir.display(),
        ds.train.len()
    );
    let (train_cases, mut warnings) = ds.load_model_inputs(&ds.train, cfg.normalize)?;
    let (test_cases, test_warnings) = ds.load_model_inputs(&ds.test, cfg.normalize)?;
    warnings.extend(test_warnings);
    if let Some(first) = warnings.first() {
        let images = train_cases.len() + test_cases.len();
        eprintln!("warning: {} of {images} images are not z-normalised, e.g. {first}", warnings.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create run folder {}", out.display()))?;
    crate::fsutil::remove_stale_temps(out)?;
    if !resume {
        // A new run replaces every file of an earlier one in the folder, so that none of them
        // (a validation history, a checkpoint to resume) outlives it half-matching.
        for f in RUN_FILES.iter().map(|f| out.join(f)).filter(|f| f.is_file()) {
            std::fs::remove_file(&f).with_context(|| format!("cannot remove {}", f.display()))?;
        }
    }

    let mut st = TrainState::new(build_model(cfg), cfg, cfg.seed ^ 0xB4_4E);
    let unlabeled_bs = if cfg.method == Method::LabeledOnly { 0 } else { cfg.batch - cfg.labeled_bs };
    let sampler = if resume {
        restore_checkpoint(out, &mut st, cfg, train_cases.len())?
    } else {
        Sampler::new(train_cases.len(), cfg.labeled, cfg.labeled_bs, unlabeled_bs.max(1), cfg.seed)?
    };
    let log_path = out.join(LOG);
    if resume && st.iter >= cfg.iters {
        println!(
            "nothing to train: {} holds iteration {} of {} (a larger --iters continues it)",
            out.display(),
            st.iter,
            cfg.iters
        );
        return Ok(last_logged(&log_path)?.unwrap_or(StepLog { iter: st.iter, ..StepLog::default() }));
    }
    crate::fsutil::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let mut log = open_log(&log_path, resume, st.iter)?;
    if resume {
        // Validations past the checkpoint run again.
        keep_rows_until(&out.join(VALIDATION), st.iter)?;
    }

    let remaining = cfg.iters.saturating_sub(st.iter);
    let batches = spawn_loader(sampler, train_cases, cfg.patch, cfg.intensity_aug, remaining);
    let bar = indicatif::ProgressBar::new(cfg.iters).with_position(st.iter);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .expect("a valid progress template"),
    );
    let start = Instant::now();
    let mut last = StepLog::default();
    // Seconds since the start when each iteration finished recording, until its values are read.
    let mut finished: Option<(u64, f64)> = None;
    let mut first =
        if remaining > 0 { Some(batches.recv().context("the batch loader stopped")??) } else { None };
    // CAML's first batch is rehearsed with its selections at their largest: the steps then take
    // the buffers it made (see `rehearse`), and the first reserves the memory of the largest.
    let rehearsed = match &first {
        Some((batch, _)) if cfg.method == Method::Caml => Some(rehearse(&mut st, cfg, batch)?),
        _ => None,
    };
    // Buffers the pool had to create in the steps after the rehearsal, or after the first.
    let mut later_allocations = 0;
    for k in 0..remaining {
        let (batch, sampler_state) = match first.take() {
            Some(b) => b,
            None => batches.recv().context("the batch loader stopped")??,
        };
        st.opt.config.lr = cfg.lr_at(st.iter + 1);
        let allocations = gpu.allocations();
        let mut logs: Vec<StepLog> = train_step(&mut st, cfg, &batch)?.into_iter().collect();
        if k > 0 || rehearsed.is_some() {
            later_allocations += gpu.allocations() - allocations;
        }
        let iter = st.iter;
        let seconds = start.elapsed().as_secs_f64();
        let final_iter = iter == cfg.iters;
        let validate =
            cfg.val_every > 0 && (iter.is_multiple_of(cfg.val_every) || final_iter) && !test_cases.is_empty();
        let save = final_iter || (cfg.checkpoint_every > 0 && iter.is_multiple_of(cfg.checkpoint_every));
        if validate || save {
            // The log and the checkpoint agree on the last iteration, and a non-finite one stops
            // the run before anything is written.
            logs.extend(flush(&mut st)?);
        }
        for l in logs {
            let at = match finished {
                Some((i, t)) if i == l.iter => t,
                _ => seconds,
            };
            writeln!(
                log,
                "{},{},{},{},{},{},{},{},{at:.3}",
                l.iter,
                l.loss,
                l.loss_s,
                l.loss_c,
                l.loss_o,
                l.lambda_c,
                l.lambda_o,
                cfg.lr_at(l.iter)
            )?;
            bar.set_message(format!(
                "loss {:.4} s {:.4} c {:.4} o {:.4}",
                l.loss, l.loss_s, l.loss_c, l.loss_o
            ));
            last = l;
        }
        log.flush()?;
        finished = Some((iter, seconds));
        bar.set_position(iter);
        if validate {
            let v = mean_dice(&st.model, &test_cases, cfg.patch)?;
            // Printed around the bar rather than through it: a hidden bar (output that is not a
            // terminal) would drop the line.
            bar.suspend(|| println!("{}", v.line(iter)));
            append_line(&out.join(VALIDATION), "iter,dice", &format!("{iter},{:.6}", v.dice))?;
        }
        if save {
            save_checkpoint(out, &st, cfg, &sampler_state)?;
        }
        // Writes only after new pipelines were compiled: the first iteration, the first validation.
        if let Err(e) = crate::gpu::gpu().save_pipeline_cache() {
            bar.suspend(|| eprintln!("warning: {e:#}"));
        }
    }
    bar.finish();
    let m = gpu.memory();
    let (counted, after) = match rehearsed {
        Some(made) => (remaining, format!("a rehearsal of the largest step, which created {made}")),
        None => (remaining.saturating_sub(1), "the first step".to_string()),
    };
    println!(
        "GPU memory: peak {:.1} MiB in tensors, {:.1} MiB reserved by the buffer pool; buffers created \
         in the {counted} {} after {after}: {later_allocations}",
        m.peak_in_use as f64 / 1048576.0,
        m.peak_reserved as f64 / 1048576.0,
        if counted == 1 { "step" } else { "steps" }
    );
    checkpoint::save(&out.join(FINAL_MODEL), &model_dict(&st.model), &model_metadata(cfg))?;
    plot_log(&log_path, &out.join("loss.png"))?;
    Ok(last)
}

/// Drops the rows of the CSV file at `path` (if any) whose first field is an iteration past
/// `iter`: those iterations run again.
fn keep_rows_until(path: &Path, iter: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split(',').next().and_then(|v| v.parse::<u64>().ok()).is_none_or(|i| i <= iter))
        .collect();
    crate::fsutil::write_atomic(path, format!("{}\n", kept.join("\n")).as_bytes())
}

fn open_log(path: &Path, resume: bool, iter: u64) -> Result<std::fs::File> {
    if resume && path.exists() {
        keep_rows_until(path, iter)?;
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()));
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{LOG_HEADER}")?;
    Ok(f)
}

fn append_line(path: &Path, header: &str, line: &str) -> Result<()> {
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if new {
        writeln!(f, "{header}")?;
    }
    writeln!(f, "{line}")?;
    Ok(())
}

/// loss.png from log.csv.
pub fn plot_log(log: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let names = ["loss", "loss_s", "loss_c", "loss_o"];
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = names.iter().map(|n| (*n, Vec::new())).collect();
    for line in text.lines().skip(1) {
        let v: Vec<f64> = line.split(',').filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 5 {
            for (k, s) in series.iter_mut().enumerate() {
                s.1.push((v[0], v[k + 1]));
            }
        }
    }
    crate::plot::line_chart(png, "training losses", &series)
}

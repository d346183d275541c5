//! `caml-wgpu train`: the run folder, the loop with a background batch loader, logging,
//! validation, checkpoints and resumption.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::caml::memory::MemoryBank;
use crate::caml::model::Caml;
use crate::caml::step::{StepLog, TrainState, train_step};
use crate::checkpoint::{self, Entry, StateDict};
use crate::config::{Method, TrainConfig};
use crate::data::dataset::{Case, Dataset};
use crate::data::sampler::{Batch, Sampler, SamplerState};
use crate::infer::predict::{PredictOptions, predict};
use crate::infer::window::WindowOptions;
use crate::metrics;
use crate::optim::{Sgd, SgdConfig};
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
    Caml::new(cfg.width, cfg.embed, cfg.method == Method::Caml, cfg.seed)
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

/// Mean Dice of the model on `cases`.
pub fn mean_dice(model: &Caml, cases: &[Case], patch: [usize; 3]) -> Result<f64> {
    let opts =
        PredictOptions { window: window_options(patch), average_decoders: false, largest_component: false };
    let mut sum = 0.0;
    for c in cases {
        let (mask, _) = predict(model, &c.image, &opts)?;
        sum += metrics::dice(mask.data(), c.label.data());
    }
    Ok(sum / cases.len().max(1) as f64)
}

fn model_dict(model: &Caml) -> StateDict {
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
        Some(text) => toml::from_str::<TrainConfig>(text)
            .with_context(|| format!("{}: unreadable saved configuration", path.display()))?,
        // A file trained elsewhere carries no configuration: it has CMA weights when it has the keys.
        None => {
            let cma = dict.keys().any(|k| k.contains("intra_attention"));
            TrainConfig { method: if cma { Method::Caml } else { Method::Mutual }, ..fallback.clone() }
        }
    };
    let model = build_model(&cfg);
    load_model_weights(&model, &dict, path)?;
    Ok((model, cfg))
}

/// Writes the complete training state in one file, atomically.
fn save_checkpoint(dir: &Path, st: &TrainState, cfg: &TrainConfig, sampler: &SamplerState) -> Result<()> {
    let mut dict = model_dict(&st.model);
    let names: Vec<String> = st.model.named().0.into_iter().map(|(k, _)| k).collect();
    for (k, m) in names.iter().zip(&st.opt.momentum) {
        dict.insert(format!("optim/{k}"), tensor_entry(m));
    }
    let mut counts = Vec::new();
    for (i, e) in st.bank.entries.iter().enumerate() {
        if let Some(e) = e {
            dict.insert(format!("bank/{i}"), tensor_entry(&e.feats));
            counts.push((i, e.counts));
        }
    }
    let mut meta = model_metadata(cfg);
    meta.insert("iteration".into(), st.iter.to_string());
    meta.insert("sampler".into(), serde_json::to_string(sampler)?);
    meta.insert("rng".into(), serde_json::to_string(&st.rng.state())?);
    meta.insert("bank".into(), serde_json::to_string(&counts)?);
    checkpoint::save(&dir.join(CHECKPOINT), &dict, &meta)
}

fn restore_checkpoint(dir: &Path, st: &mut TrainState) -> Result<SamplerState> {
    let path = dir.join(CHECKPOINT);
    let (dict, meta) = checkpoint::load(&path)?;
    load_model_weights(&st.model, &dict, &path)?;
    let get = |k: &str| meta.get(k).with_context(|| format!("{}: no '{k}' entry", path.display()));
    st.iter = get("iteration")?.parse().with_context(|| format!("{}: bad iteration", path.display()))?;
    let names: Vec<String> = st.model.named().0.into_iter().map(|(k, _)| k).collect();
    for (k, m) in names.iter().zip(&st.opt.momentum) {
        let key = format!("optim/{k}");
        let e = dict.get(&key).with_context(|| format!("{}: missing {key}", path.display()))?;
        load_entry(m, e, &key, &path)?;
    }
    let counts: Vec<(usize, [usize; 2])> = serde_json::from_str(get("bank")?)?;
    for (i, c) in counts {
        let key = format!("bank/{i}");
        let e = dict.get(&key).with_context(|| format!("{}: missing {key}", path.display()))?;
        let v = e.as_f32().with_context(|| format!("{}: {key} is not f32", path.display()))?;
        ensure!(i < st.bank.entries.len(), "{}: bank entry {i} out of range", path.display());
        st.bank.update(i, Tensor::from_vec(v, &e.shape), c);
    }
    st.rng = Rng::from_state(serde_json::from_str::<RngState>(get("rng")?)?);
    Ok(serde_json::from_str(get("sampler")?)?)
}

/// Batches prepared on a background thread, each with the sampler state after it, so that a
/// checkpoint records exactly where the stream stands.
fn spawn_loader(
    mut sampler: Sampler,
    cases: Vec<Case>,
    patch: [usize; 3],
    count: u64,
) -> Receiver<Result<(Batch, SamplerState)>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        for _ in 0..count {
            let item = sampler.next_batch(&cases, patch).map(|b| (b, sampler.state()));
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                break;
            }
        }
    });
    rx
}

const LOG_HEADER: &str = "iter,loss,loss_s,loss_c,loss_o,lambda_c,lambda_o,lr,seconds";

/// Trains as `cfg` says, into `out`; with `resume`, continues the run saved there.
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool) -> Result<StepLog> {
    cfg.validate()?;
    let data_dir = dataset_dir(cfg.data.as_deref())?;
    let ds = Dataset::open(&data_dir)?;
    ensure!(
        cfg.labeled <= ds.train.len(),
        "{} labeled cases requested but {} lists only {} training cases",
        cfg.labeled,
        data_dir.display(),
        ds.train.len()
    );
    let train_cases = ds.load_train()?;
    let test_cases = ds.load_test()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create run folder {}", out.display()))?;

    let model = build_model(cfg);
    let params = model.params();
    let opt =
        Sgd::new(SgdConfig { lr: cfg.lr, momentum: cfg.momentum, weight_decay: cfg.weight_decay }, &params);
    let mut st = TrainState {
        model,
        opt,
        bank: MemoryBank::new(cfg.labeled, cfg.memory_num),
        rng: Rng::new(cfg.seed ^ 0xB4_4E),
        iter: 0,
    };
    let unlabeled_bs = if cfg.method == Method::LabeledOnly { 0 } else { cfg.batch - cfg.labeled_bs };
    let sampler = if resume {
        Sampler::from_state(restore_checkpoint(out, &mut st)?)?
    } else {
        Sampler::new(train_cases.len(), cfg.labeled, cfg.labeled_bs, unlabeled_bs.max(1), cfg.seed)?
    };
    crate::fsutil::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let log_path = out.join("log.csv");
    let mut log = open_log(&log_path, resume, st.iter)?;

    let remaining = cfg.iters.saturating_sub(st.iter);
    let batches = spawn_loader(sampler, train_cases, cfg.patch, remaining);
    let bar = indicatif::ProgressBar::new(cfg.iters).with_position(st.iter);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .expect("a valid progress template"),
    );
    let start = Instant::now();
    let mut last = StepLog::default();
    for _ in 0..remaining {
        let (batch, sampler_state) = batches.recv().context("the batch loader stopped")??;
        last = train_step(&mut st, cfg, &batch)?;
        writeln!(
            log,
            "{},{},{},{},{},{},{},{},{:.3}",
            last.iter,
            last.loss,
            last.loss_s,
            last.loss_c,
            last.loss_o,
            last.lambda_c,
            last.lambda_o,
            cfg.lr,
            start.elapsed().as_secs_f64()
        )?;
        log.flush()?;
        bar.set_position(last.iter);
        bar.set_message(format!(
            "loss {:.4} s {:.4} c {:.4} o {:.4}",
            last.loss, last.loss_s, last.loss_c, last.loss_o
        ));
        let final_iter = last.iter == cfg.iters;
        if cfg.val_every > 0 && (last.iter % cfg.val_every == 0 || final_iter) && !test_cases.is_empty() {
            let dice = mean_dice(&st.model, &test_cases, cfg.patch)?;
            bar.println(format!(
                "iteration {}: validation Dice {dice:.4} on {} test cases",
                last.iter,
                test_cases.len()
            ));
            append_line(&out.join("validation.csv"), "iter,dice", &format!("{},{dice:.6}", last.iter))?;
        }
        if final_iter || (cfg.checkpoint_every > 0 && last.iter % cfg.checkpoint_every == 0) {
            save_checkpoint(out, &st, cfg, &sampler_state)?;
        }
        // Writes only after new pipelines were compiled: the first iteration, the first validation.
        if let Err(e) = crate::gpu::gpu().save_pipeline_cache() {
            bar.println(format!("warning: {e:#}"));
        }
    }
    bar.finish();
    checkpoint::save(&out.join(FINAL_MODEL), &model_dict(&st.model), &model_metadata(cfg))?;
    plot_log(&log_path, &out.join("loss.png"))?;
    Ok(last)
}

fn open_log(path: &Path, resume: bool, iter: u64) -> Result<std::fs::File> {
    if resume && path.exists() {
        // Drop lines past the checkpoint: those iterations run again.
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| l.split(',').next().and_then(|v| v.parse::<u64>().ok()).is_none_or(|i| i <= iter))
            .collect();
        crate::fsutil::write_atomic(path, format!("{}\n", kept.join("\n")).as_bytes())?;
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

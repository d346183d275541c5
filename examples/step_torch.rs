//! One CAML training step in caml-wgpu on fixed weights and a fixed batch, for
//! `benches/reference/check_step.py` to repeat in PyTorch and compare.
//!
//! ```sh
//! cargo run --release --example step_torch -- DIR [--omni W]
//! python benches/reference/check_step.py DIR
//! ```
//!
//! Writes to DIR: `before.safetensors` (the small preset's initial weights), `batch.safetensors`
//! (`image` [B, 1, X, Y, Z], `label` [B, X, Y, Z] as f32, `lr` [1], `omni` [1], and per class c
//! whose memory was drawn `memory_c`: the positions drawn, as i64) and `after.safetensors` (the
//! weights and BatchNorm statistics after one step at iteration 1), and prints the loss parts.
//! The two programs draw random numbers from different streams, so the attention layers' dropout
//! is off and PyTorch takes the memory bank's draws from `memory_c`. The omni-correlation's
//! weight is 0 unless `--omni W` sets it (at iteration 1 its ramp is e^-5: W = 100 gives the
//! term a weight of 0.67, as large as the others'); every other term enters the gradient as in
//! a run.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};
use caml_wgpu::caml::step::{TrainState, flush, train_step};
use caml_wgpu::checkpoint::{self, Entry, StateDict};
use caml_wgpu::config::{Preset, TrainConfig};
use caml_wgpu::data::sampler::{Batch, BatchIndices};
use caml_wgpu::rng::Rng;
use caml_wgpu::train::model_dict;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, omni) = match args.as_slice() {
        [dir] => (dir, 0.0),
        [dir, flag, w] if flag == "--omni" => (dir, w.parse()?),
        _ => bail!("usage: step_torch DIR [--omni W]"),
    };
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)?;
    caml_wgpu::gpu::Gpu::init()?;
    let mut cfg = TrainConfig::preset(Preset::Small);
    cfg.omni = omni;
    let mut model = caml_wgpu::train::build_model(&cfg);
    // Without the attention layers' dropout (0.5, random masks that the two programs draw
    // differently); check_step.py turns PyTorch's off too.
    if let Some(cma) = model.encoder2.cma.as_mut() {
        for layer in [&mut cma.intra_attention, &mut cma.inter_attention] {
            layer.dropout = 0.0;
            layer.self_attn.dropout = 0.0;
        }
    }
    let mut st = TrainState::new(model, &cfg, 1);
    let meta = HashMap::new();
    checkpoint::save(&dir.join("before.safetensors"), &model_dict(&st.model), &meta)?;

    // Images uniform in [-1, 1]; foreground a ball whose centre moves along X from sample to sample.
    let [x, y, z] = cfg.patch;
    let n = x * y * z;
    let images = Rng::new(7).vec(cfg.batch * n, -1.0, 1.0);
    let labels: Vec<u8> = (0..cfg.batch * n)
        .map(|i| {
            let (s, v) = (i / n, i % n);
            let (a, b, c) = ((v / (y * z)) as f32, (v / z % y) as f32, (v % z) as f32);
            let (ca, cb, cc) = (x as f32 * (0.4 + 0.1 * s as f32), y as f32 * 0.5, z as f32 * 0.5);
            ((a - ca).powi(2) + (b - cb).powi(2) + (c - cc).powi(2) < (z as f32 * 0.3).powi(2)) as u8
        })
        .collect();
    let mut batch_dict = StateDict::new();
    batch_dict.insert("omni".into(), Entry::f32(&[1], vec![cfg.omni as f32]));
    batch_dict.insert("image".into(), Entry::f32(&[cfg.batch, 1, x, y, z], images.clone()));
    let label_f: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    batch_dict.insert("label".into(), Entry::f32(&[cfg.batch, x, y, z], label_f));
    // The learning rate of iteration 1, for PyTorch's optimizer.
    batch_dict.insert("lr".into(), Entry::f32(&[1], vec![cfg.lr_at(1)]));

    let indices = BatchIndices {
        labeled: (0..cfg.labeled_bs).collect(),
        unlabeled: (cfg.labeled..cfg.labeled + cfg.batch - cfg.labeled_bs).collect(),
    };
    let batch = Batch { indices, patch: cfg.patch, images, labels };
    st.opt.config.lr = cfg.lr_at(1);
    let mut draws = st.rng.clone();
    let mut log = train_step(&mut st, &cfg, &batch)?;
    if log.is_none() {
        log = flush(&mut st)?;
    }
    let Some(l) = log else { bail!("the step logged nothing") };
    println!(
        "caml-wgpu: loss {} loss_s {} loss_c {} loss_o {} lambda_c {} lambda_o {} lr {}",
        l.loss,
        l.loss_s,
        l.loss_c,
        l.loss_o,
        l.lambda_c,
        l.lambda_o,
        cfg.lr_at(1)
    );
    // The bank after the step is the one the step drew from (updated before the draw, not
    // after); the same stream then draws the same positions, and ends where the step's did.
    let drawn = st.bank.draw(&mut draws);
    if draws.state() != st.rng.state() {
        bail!("the step drew from its random stream other than the memory bank's one draw");
    }
    for (c, picks) in drawn.into_iter().enumerate() {
        if let Some(picks) = picks {
            let len = picks.len();
            let picks = picks.into_iter().map(|p| p as i64).collect();
            batch_dict.insert(format!("memory_{c}"), Entry::i64(&[len], picks));
        }
    }
    checkpoint::save(&dir.join("batch.safetensors"), &batch_dict, &meta)?;
    checkpoint::save(&dir.join("after.safetensors"), &model_dict(&st.model), &meta)?;
    Ok(())
}

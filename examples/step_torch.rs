//! One CAML training step in caml-wgpu on fixed weights and a fixed batch, for
//! `benches/reference/check_step.py` to repeat in PyTorch and compare.
//!
//! ```sh
//! cargo run --release --example step_torch -- DIR
//! python benches/reference/check_step.py DIR
//! ```
//!
//! Writes to DIR: `before.safetensors` (the small preset's initial weights), `batch.safetensors`
//! (`image` [B, 1, X, Y, Z], `label` [B, X, Y, Z] as f32, `lr` [1]) and `after.safetensors` (the weights and
//! BatchNorm statistics after one step at iteration 1), and prints the loss parts. What draws
//! random numbers is left out, as the two programs draw from different streams: the
//! omni-correlation's weight is 0 (its value depends on the memory bank's draws) and the
//! attention layers' dropout is off; every other term enters the gradient as in a run.

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
    let [dir] = args.as_slice() else { bail!("usage: step_torch DIR") };
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)?;
    caml_wgpu::gpu::Gpu::init()?;
    let mut cfg = TrainConfig::preset(Preset::Small);
    cfg.omni = 0.0;
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
    batch_dict.insert("image".into(), Entry::f32(&[cfg.batch, 1, x, y, z], images.clone()));
    let label_f: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    batch_dict.insert("label".into(), Entry::f32(&[cfg.batch, x, y, z], label_f));
    // The learning rate of iteration 1, for PyTorch's optimizer.
    batch_dict.insert("lr".into(), Entry::f32(&[1], vec![cfg.lr_at(1)]));
    checkpoint::save(&dir.join("batch.safetensors"), &batch_dict, &meta)?;

    let indices = BatchIndices {
        labeled: (0..cfg.labeled_bs).collect(),
        unlabeled: (cfg.labeled..cfg.labeled + cfg.batch - cfg.labeled_bs).collect(),
    };
    let batch = Batch { indices, patch: cfg.patch, images, labels };
    st.opt.config.lr = cfg.lr_at(1);
    let mut log = train_step(&mut st, &cfg, &batch)?;
    if log.is_none() {
        log = flush(&mut st)?;
    }
    let Some(l) = log else { bail!("the step logged nothing") };
    println!(
        "caml-wgpu: loss {} loss_s {} loss_c {} lambda_c {} lr {}",
        l.loss,
        l.loss_s,
        l.loss_c,
        l.lambda_c,
        cfg.lr_at(1)
    );
    checkpoint::save(&dir.join("after.safetensors"), &model_dict(&st.model), &meta)?;
    Ok(())
}

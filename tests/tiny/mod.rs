//! A tiny CAML training setup (width 2, embedding 4, two 16^3 samples of which one labeled) for
//! tests of whole training steps.

use caml_wgpu::caml::memory::MemoryBank;
use caml_wgpu::caml::step::TrainState;
use caml_wgpu::config::{Preset, TrainConfig};
use caml_wgpu::data::sampler::{Batch, BatchIndices};
use caml_wgpu::optim::{Sgd, SgdConfig};
use caml_wgpu::rng::Rng;

/// The small preset at the tiny size.
pub fn config() -> TrainConfig {
    TrainConfig {
        width: 2,
        embed: 4,
        patch: [16, 16, 16],
        batch: 2,
        labeled_bs: 1,
        labeled: 2,
        ..TrainConfig::preset(Preset::Small)
    }
}

/// A fresh model, its optimizer (momentum 0.9) and an empty memory bank.
pub fn state(cfg: &TrainConfig, weight_decay: f32) -> TrainState {
    let model = caml_wgpu::train::build_model(cfg);
    let opt = Sgd::new(SgdConfig { lr: cfg.lr, momentum: 0.9, weight_decay }, &model.params());
    let bank =
        MemoryBank::new(cfg.labeled, cfg.memory_num, caml_wgpu::caml::step::bank_capacity(cfg), cfg.embed);
    TrainState { model, opt, bank, rng: Rng::new(1), iter: 0, pending: None }
}

/// Case 0 (labeled: half of each row of voxels foreground) and case 2 (unlabeled), random images.
pub fn batch(cfg: &TrainConfig) -> Batch {
    let n: usize = cfg.patch.iter().product();
    let labels = (0..2 * n).map(|i| (i % 16 < 8) as u8).collect();
    let indices = BatchIndices { labeled: vec![0], unlabeled: vec![2] };
    Batch { indices, patch: cfg.patch, images: Rng::new(5).vec(2 * n, -1.0, 1.0), labels }
}

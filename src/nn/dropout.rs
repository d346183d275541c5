//! Dropout layers: each training forward draws a fresh seed from the layer's own seeded stream,
//! so a run is reproducible from the seeds the layers were built with.

use std::sync::Mutex;

use crate::ops::dropout::{dropout, dropout3d};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// torch.nn.Dropout3d(p): zeroes whole (sample, channel) volumes in training.
pub struct Dropout3d {
    pub p: f32,
    seeds: Mutex<Rng>,
}

impl Dropout3d {
    pub fn new(p: f32, seed: u64) -> Self {
        Dropout3d { p, seeds: Mutex::new(Rng::new(seed)) }
    }

    /// [N, C, ...] -> same shape; the identity in evaluation.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if !train {
            return x.clone();
        }
        dropout3d(x, self.p, self.seeds.lock().unwrap().next_u64(), train)
    }
}

/// torch.nn.Dropout(p): zeroes single elements in training.
pub struct Dropout {
    pub p: f32,
    seeds: Mutex<Rng>,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        Dropout { p, seeds: Mutex::new(Rng::new(seed)) }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if !train {
            return x.clone();
        }
        dropout(x, self.p, self.seeds.lock().unwrap().next_u64(), train)
    }
}

//! SGD with momentum and weight decay, PyTorch's semantics, updating parameters in place.

use crate::autograd::Grads;
use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 0.01, momentum: 0.9, weight_decay: 1e-4 }
    }
}

/// One momentum buffer per parameter. Buffers start at zero, which makes the first step's
/// `buf = momentum * 0 + g` equal PyTorch's `buf = g`.
pub struct Sgd {
    pub config: SgdConfig,
    pub momentum: Vec<Tensor>,
}

impl Sgd {
    pub fn new(config: SgdConfig, params: &[Tensor]) -> Sgd {
        Sgd { config, momentum: params.iter().map(|p| Tensor::zeros(p.shape())).collect() }
    }

    /// Updates every parameter that has a gradient; the others keep their values and momentum.
    pub fn step(&mut self, params: &[Tensor], grads: &Grads) {
        self.launch(params, grads, None);
    }

    /// [`Sgd::step`], skipped on the device when any entry of `guard` is infinite or NaN: the
    /// step can be recorded before the host has read the values it depends on.
    pub fn step_guarded(&mut self, params: &[Tensor], grads: &Grads, guard: &Tensor) {
        self.launch(params, grads, Some(guard));
    }

    fn launch(&mut self, params: &[Tensor], grads: &Grads, guard: Option<&Tensor>) {
        assert_eq!(params.len(), self.momentum.len(), "parameter list changed since the optimizer was made");
        let c = self.config;
        let kernel = Kernel::new("optim", "sgd");
        let guard_len = guard.map_or(0, |g| g.numel());
        for (w, buf) in params.iter().zip(&self.momentum) {
            let Some(g) = grads.get(w) else { continue };
            // Without a guard the gradient is bound in its place, never read there.
            let guard = guard.unwrap_or(g);
            assert_eq!(g.shape(), w.shape(), "gradient shape for {w:?}");
            let p = Params::new().u(w.numel()).f(c.lr).f(c.momentum).f(c.weight_decay).u(guard_len);
            gpu().dispatch_1d(
                &kernel,
                p.bytes(),
                &[g.binding(), w.binding(), buf.binding(), guard.binding()],
                w.numel() as u64,
            );
        }
    }
}

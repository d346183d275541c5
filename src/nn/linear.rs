//! The Linear layer.

use super::{Named, default_init, join};
use crate::ops::linear::linear;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// torch.nn.Linear(in, out): y = x W^T + b.
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Tensor,
}

impl Linear {
    pub fn new(inp: usize, out: usize, rng: &mut Rng) -> Self {
        let (weight, bias) = default_init(rng, &[out, inp], inp, out);
        Linear { weight, bias }
    }

    /// [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        linear(x, &self.weight, Some(&self.bias))
    }

    pub fn params(&self, prefix: &str, out: &mut Named) {
        out.push((join(prefix, "weight"), self.weight.clone()));
        out.push((join(prefix, "bias"), self.bias.clone()));
    }
}

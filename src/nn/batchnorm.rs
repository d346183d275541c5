//! The BatchNorm layer (BatchNorm3d and BatchNorm1d: both normalize axis 1).

use super::{Named, join};
use crate::ops::batchnorm::{BatchNormState, batch_norm, update_running_stats};
use crate::tensor::Tensor;

/// torch.nn.BatchNorm3d / BatchNorm1d(channels), eps 1e-5, momentum 0.1, affine, tracking running
/// statistics. Training-mode forwards update the running statistics in place.
pub struct BatchNorm {
    /// `[C]`, initialized to 1.
    pub weight: Tensor,
    /// `[C]`, initialized to 0.
    pub bias: Tensor,
    /// `[C]`, initialized to 0.
    pub running_mean: Tensor,
    /// `[C]`, initialized to 1.
    pub running_var: Tensor,
    /// A U32 counter of shape `[]` (an int64 scalar in PyTorch's state_dict).
    pub num_batches_tracked: Tensor,
    pub momentum: f32,
    pub eps: f32,
}

impl BatchNorm {
    pub fn new(channels: usize) -> Self {
        BatchNorm {
            weight: Tensor::variable(&vec![1.0; channels], &[channels]),
            bias: Tensor::variable(&vec![0.0; channels], &[channels]),
            running_mean: Tensor::zeros(&[channels]),
            running_var: Tensor::full(&[channels], 1.0),
            num_batches_tracked: Tensor::from_u32(&[0], &[]),
            momentum: 0.1,
            eps: 1e-5,
        }
    }

    fn state(&self) -> BatchNormState<'_> {
        BatchNormState {
            weight: &self.weight,
            bias: &self.bias,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            num_batches_tracked: &self.num_batches_tracked,
            momentum: self.momentum,
            eps: self.eps,
        }
    }

    /// [N, C, ...] -> same shape.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        batch_norm(x, &self.state(), train, false)
    }

    /// relu(forward(x)) in one pass, with its own backward.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Tensor {
        batch_norm(x, &self.state(), train, true)
    }

    /// The running statistics moved as a training-mode forward over `rows` rows of batch mean
    /// `mean` `[C]` and biased variance `var` `[C]` would move them.
    pub fn update_running(&self, mean: &Tensor, var: &Tensor, rows: usize) {
        update_running_stats(&self.state(), mean, var, rows);
    }

    /// The trainable parameters: weight, bias.
    pub fn params(&self, prefix: &str, out: &mut Named) {
        out.push((join(prefix, "weight"), self.weight.clone()));
        out.push((join(prefix, "bias"), self.bias.clone()));
    }

    /// The buffers: running_mean, running_var, num_batches_tracked.
    pub fn buffers(&self, prefix: &str, out: &mut Named) {
        out.push((join(prefix, "running_mean"), self.running_mean.clone()));
        out.push((join(prefix, "running_var"), self.running_var.clone()));
        out.push((join(prefix, "num_batches_tracked"), self.num_batches_tracked.clone()));
    }
}

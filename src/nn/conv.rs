//! Conv3d and ConvTranspose3d layers (with bias), calling `crate::ops::conv`.

use super::{Named, default_init, join};
use crate::ops::conv;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// torch.nn.Conv3d(cin, cout, k, stride, padding) with a cubic kernel.
pub struct Conv3d {
    /// `[cout, cin, k, k, k]`
    pub weight: Tensor,
    /// `[cout]`
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
}

impl Conv3d {
    /// fan_in = cin * k^3.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, rng: &mut Rng) -> Self {
        let (weight, bias) = default_init(rng, &[cout, cin, k, k, k], cin * k * k * k, cout);
        Conv3d { weight, bias, stride, padding }
    }

    /// [N, cin, X, Y, Z] -> [N, cout, X', Y', Z'].
    pub fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        conv::conv3d(x, &self.weight, &self.bias, self.stride, self.padding)
    }

    /// The same values when a BatchNorm follows; in training (`train`) the bias then gets a zero
    /// gradient without a pass over the output gradient ([`conv::conv3d_before_batchnorm`]).
    pub fn forward_before_batchnorm(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            conv::conv3d_before_batchnorm(x, &self.weight, &self.bias, self.stride, self.padding)
        } else {
            self.forward(x, train)
        }
    }

    pub fn params(&self, prefix: &str, out: &mut Named) {
        out.push((join(prefix, "weight"), self.weight.clone()));
        out.push((join(prefix, "bias"), self.bias.clone()));
    }
}

/// torch.nn.ConvTranspose3d(cin, cout, k, stride = k): each input voxel becomes a k^3 block.
pub struct ConvTranspose3d {
    /// `[cin, cout, k, k, k]`, PyTorch's layout for transposed convolutions.
    pub weight: Tensor,
    /// `[cout]`
    pub bias: Tensor,
}

impl ConvTranspose3d {
    /// PyTorch computes fan_in from dimension 1 of the weight, which here is cout: fan_in = cout * k^3.
    pub fn new(cin: usize, cout: usize, k: usize, rng: &mut Rng) -> Self {
        let (weight, bias) = default_init(rng, &[cin, cout, k, k, k], cout * k * k * k, cout);
        ConvTranspose3d { weight, bias }
    }

    /// [N, cin, X, Y, Z] -> [N, cout, kX, kY, kZ].
    pub fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        conv::conv_transpose3d(x, &self.weight, &self.bias)
    }

    /// As [`Conv3d::forward_before_batchnorm`].
    pub fn forward_before_batchnorm(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            conv::conv_transpose3d_before_batchnorm(x, &self.weight, &self.bias)
        } else {
            self.forward(x, train)
        }
    }

    pub fn params(&self, prefix: &str, out: &mut Named) {
        out.push((join(prefix, "weight"), self.weight.clone()));
        out.push((join(prefix, "bias"), self.bias.clone()));
    }
}

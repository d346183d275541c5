//! Layers with named parameters. Each holds its parameters as gradient-tracking tensors under the
//! names PyTorch's state_dict gives them relative to the layer (`weight`, `bias`, `running_mean`,
//! `running_var`, `num_batches_tracked`), lists them under a prefix for checkpoints and optimizers,
//! and initializes them as PyTorch does from a seeded generator.

pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod linear;
pub mod transformer;

pub use batchnorm::BatchNorm;
pub use conv::{Conv3d, ConvTranspose3d};
pub use dropout::{Dropout, Dropout3d};
pub use linear::Linear;

use crate::rng::Rng;
use crate::tensor::Tensor;

/// A list of named tensors, e.g. `encoder1.block_one.conv.0.weight`.
pub type Named = Vec<(String, Tensor)>;

/// `prefix.name`, or `name` under an empty prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

/// PyTorch's default for conv and linear layers: kaiming_uniform_(a = sqrt(5)) on the weight, which
/// is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias. Drawn weight first.
fn default_init(rng: &mut Rng, weight_shape: &[usize], fan_in: usize, bias_len: usize) -> (Tensor, Tensor) {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let n: usize = weight_shape.iter().product();
    let w = rng.vec(n, -bound, bound);
    let b = rng.vec(bias_len, -bound, bound);
    (Tensor::variable(&w, weight_shape), Tensor::variable(&b, &[bias_len]))
}

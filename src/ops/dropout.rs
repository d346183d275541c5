//! Dropout3d (whole (sample, channel) volumes) and elementwise dropout, with a seeded
//! counter-based generator on the GPU: the mask is a pure function of (seed, unit index), so the
//! backward regenerates it instead of saving it.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, plane_groups, range_binding};
use crate::tensor::Tensor;

/// Fixed-point drop threshold of probability `p` (24 bits) and the scale of kept values.
fn threshold_and_scale(p: f32) -> (u32, f32) {
    assert!((0.0..=1.0).contains(&p), "dropout probability {p} outside [0, 1]");
    let threshold = (p as f64 * (1u64 << 24) as f64).round() as u32;
    (threshold, if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 })
}

/// x seen as [units, inner]: each unit zeroed with probability `p`, the rest scaled by 1/(1-p).
pub(crate) fn apply(x: &Tensor, p: f32, seed: u64, inner: usize) -> Tensor {
    let (threshold, scale) = threshold_and_scale(p);
    let units = x.numel() / inner.max(1);
    let y = Tensor::empty(x.shape());
    for (u0, count) in plane_groups(units, &[inner]) {
        let n = count * inner;
        let params = Params::new()
            .u(n)
            .u(inner)
            .u(u0)
            .u(threshold as usize)
            .u((seed & 0xffff_ffff) as usize)
            .u((seed >> 32) as usize)
            .f(scale);
        let quads = inner.is_multiple_of(4);
        gpu().dispatch_1d(
            &Kernel::new("dropout", if quads { "dropout4" } else { "dropout" }),
            params.bytes(),
            &[range_binding(x, u0 * inner, n), range_binding(&y, u0 * inner, n)],
            if quads { n as u64 / 4 } else { n as u64 },
        );
    }
    y
}

fn dropout_units(x: &Tensor, p: f32, seed: u64, inner: usize) -> Tensor {
    let y = apply(x, p, seed, inner);
    Tensor::with_op(y, Op::Dropout { x: x.graph_handle(), p, seed, inner })
}

/// The backward: dy through the same mask and scale.
pub fn dropout_grad(dy: &Tensor, p: f32, seed: u64, inner: usize) -> Tensor {
    apply(dy, p, seed, inner)
}

/// torch.nn.Dropout3d on [N, C, ...]: zeroes whole (sample, channel) volumes with probability `p`
/// in training; the identity in evaluation.
pub fn dropout3d(x: &Tensor, p: f32, seed: u64, train: bool) -> Tensor {
    assert!(x.rank() >= 2, "dropout3d needs [N, C, ...], got {:?}", x.shape());
    if !train || p == 0.0 {
        return x.clone();
    }
    dropout_units(x, p, seed, x.shape()[2..].iter().product())
}

/// torch.nn.functional.dropout: each element zeroed with probability `p` in training.
pub fn dropout(x: &Tensor, p: f32, seed: u64, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return x.clone();
    }
    dropout_units(x, p, seed, 1)
}

/// CPU references: the same generator, bit for bit.
pub mod cpu {
    fn pcg(v: u32) -> u32 {
        let state = v.wrapping_mul(747796405).wrapping_add(2891336453);
        let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
        (word >> 22) ^ word
    }

    /// Whether unit `u` survives dropout with probability `p` under `seed`.
    pub fn keep(u: u32, p: f32, seed: u64) -> bool {
        let h = pcg(pcg(pcg(u) ^ seed as u32) ^ (seed >> 32) as u32);
        (h >> 8) >= super::threshold_and_scale(p).0
    }

    /// x seen as [units, inner], dropped per unit.
    pub fn dropout(x: &[f32], inner: usize, p: f32, seed: u64) -> Vec<f32> {
        let scale = super::threshold_and_scale(p).1;
        x.iter()
            .enumerate()
            .map(|(k, &v)| if keep((k / inner) as u32, p, seed) { v * scale } else { 0.0 })
            .collect()
    }
}

//! LayerNorm over the last dimension (PyTorch's `nn.LayerNorm(d)`: biased variance, affine).

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::reduce::sum_keepdim;
use crate::ops::{Params, plane_groups, range_binding};
use crate::tensor::Tensor;

/// x `[..., d]`, w `[d]`, b `[d]` -> `[..., d]`: (x - mean) / sqrt(var + eps) * w + b per row of d.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
    let d = *x.shape().last().expect("layer_norm of a scalar");
    assert!(w.shape() == [d] && b.shape() == [d], "layer_norm weight {:?}, bias {:?} for d = {d}", w, b);
    let rows = x.numel() / d;
    let (y, mean, rstd) = (Tensor::empty(x.shape()), Tensor::empty(&[rows]), Tensor::empty(&[rows]));
    for (r0, count) in plane_groups(rows, &[d, 1]) {
        let (full, row) = (|t| range_binding(t, r0 * d, count * d), |t| range_binding(t, r0, count));
        gpu().dispatch_1d(
            &Kernel::new("layernorm", "forward"),
            Params::new().u(count).u(d).f(eps).bytes(),
            &[full(x), w.binding(), b.binding(), full(&y), row(&mean), row(&rstd)],
            count as u64,
        );
    }
    Tensor::with_op(y, Op::LayerNorm { x: x.clone(), w: w.clone(), b: b.clone(), mean, rstd })
}

/// (dx, dw, db) of layer_norm given dL/dy `g`, from the saved row statistics.
pub(crate) fn layer_norm_grad(
    x: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    g: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let d = w.numel();
    let rows = x.numel() / d;
    let (dx, gxhat) = (Tensor::empty(x.shape()), Tensor::empty(&[rows, d]));
    for (r0, count) in plane_groups(rows, &[d, 1]) {
        let (full, row) = (|t| range_binding(t, r0 * d, count * d), |t| range_binding(t, r0, count));
        gpu().dispatch_1d(
            &Kernel::new("layernorm", "backward"),
            Params::new().u(count).u(d).f(0.0).bytes(),
            &[full(x), w.binding(), full(g), row(mean), row(rstd), full(&dx), full(&gxhat)],
            count as u64,
        );
    }
    let dw = sum_keepdim(&gxhat, &[0]).reshape(&[d]);
    let db = sum_keepdim(&g.reshape(&[rows, d]), &[0]).reshape(&[d]);
    (dx, dw, db)
}

impl Tensor {
    /// LayerNorm over the last dimension.
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
        layer_norm(self, w, b, eps)
    }
}

/// CPU reference (f64 arithmetic).
pub mod cpu {
    /// x [rows, d] row by row.
    pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                row.iter()
                    .zip(w.iter().zip(b))
                    .map(move |(&v, (&wi, &bi))| ((v as f64 - mean) * rstd * wi as f64 + bi as f64) as f32)
            })
            .collect()
    }
}

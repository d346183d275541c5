//! The sharpened mutual consistency loss of two probability maps in one pass forward and one
//! backward (SPEC section 2, item 2): loss_c = mse(P_v, sharpen(P_a)) + mse(P_a, sharpen(P_v)),
//! gradients through the sharpened targets unless they are detached. Composed of elementwise ops
//! it takes about twenty passes over the maps each way.

use crate::autograd::{Op, no_grad};
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, plane_groups, range_binding};
use crate::tensor::Tensor;

fn params(n: usize, temperature: f32, total: usize) -> Params {
    Params::new().u(n).u(0).f(1.0 / temperature).f(2.0 / total as f32)
}

/// mean((u - s(w))^2) + mean((w - s(u))^2), s the sharpening of temperature T; u and w have the
/// same shape. A scalar.
pub fn consistency_loss(u: &Tensor, w: &Tensor, temperature: f32, detach_targets: bool) -> Tensor {
    assert_eq!(u.shape(), w.shape(), "consistency loss of maps {:?} and {:?}", u.shape(), w.shape());
    let n = u.numel();
    let sq = Tensor::empty(&[n]);
    for (start, count) in plane_groups(n, &[1]) {
        gpu().dispatch_1d(
            &Kernel::new("elementwise", "consistency_terms"),
            params(count, temperature, n).bytes(),
            &[
                range_binding(u, start, count),
                range_binding(w, start, count),
                range_binding(&sq, start, count),
            ],
            count as u64,
        );
    }
    let loss = no_grad(|| sq.sum_all().mul_scalar(1.0 / n as f32));
    Tensor::with_op(loss, Op::Consistency { u: u.clone(), w: w.clone(), temperature, detach_targets })
}

/// Gradients of u and w given the loss's gradient `g` (one value).
pub fn consistency_grad(u: &Tensor, w: &Tensor, g: &Tensor, temperature: f32, detach: bool) -> [Tensor; 2] {
    let n = u.numel();
    let (du, dw) = (Tensor::empty(u.shape()), Tensor::empty(w.shape()));
    let kernel = Kernel::new("elementwise", "consistency_grad").with("DETACH", detach as u8 as f64);
    for (start, count) in plane_groups(n, &[1]) {
        gpu().dispatch_1d(
            &kernel,
            params(count, temperature, n).bytes(),
            &[
                range_binding(u, start, count),
                range_binding(w, start, count),
                g.binding(),
                range_binding(&du, start, count),
                range_binding(&dw, start, count),
            ],
            count as u64,
        );
    }
    [du, dw]
}

/// CPU reference (f64): the loss, and its gradients for a loss gradient of 1.
pub mod cpu {
    fn sharpen(x: f64, e: f64) -> f64 {
        let a = x.powf(e);
        a / (a + (1.0 - x).powf(e))
    }

    fn sharpen_grad(x: f64, e: f64) -> f64 {
        let (a, b) = (x.powf(e), (1.0 - x).powf(e));
        e * x.powf(e - 1.0) * (1.0 - x).powf(e - 1.0) / ((a + b) * (a + b))
    }

    pub fn consistency(u: &[f32], w: &[f32], temperature: f32, detach: bool) -> (f32, Vec<f32>, Vec<f32>) {
        let e = 1.0 / temperature as f64;
        let m = u.len() as f64;
        let mut loss = 0.0;
        let (mut du, mut dw) = (Vec::with_capacity(u.len()), Vec::with_capacity(u.len()));
        for (&u, &w) in u.iter().zip(w) {
            let (u, w) = (u as f64, w as f64);
            let (ru, rw) = (u - sharpen(w, e), w - sharpen(u, e));
            loss += (ru * ru + rw * rw) / m;
            let (gu, gw) =
                if detach { (ru, rw) } else { (ru - rw * sharpen_grad(u, e), rw - ru * sharpen_grad(w, e)) };
            du.push((2.0 * gu / m) as f32);
            dw.push((2.0 * gw / m) as f32);
        }
        (loss as f32, du, dw)
    }
}

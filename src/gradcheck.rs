//! Finite-difference gradient checks, shared by every op's tests.
//!
//! The function under test maps input tensors to a scalar. Analytic gradients come from
//! `backward`; numeric ones from central differences (f(x + h) - f(x - h)) / 2h on the GPU in
//! f32. The truncation error of central differences is O(h^2 f'''), the rounding error about
//! eps_f32 * |f| / h; h = 1e-2 balances the two for inputs and outputs of order one (both then
//! near 1e-4 relative), so a tolerance of a few 1e-3 relative separates a correct gradient from a
//! wrong one (a wrong rule is typically off by O(1)). Inputs are kept away from kinks (relu at 0,
//! clamp bounds) by the caller.

use crate::autograd::{backward, no_grad};
use crate::tensor::Tensor;

pub use crate::rng::Rng;

pub struct Tolerance {
    pub step: f32,
    pub rel: f32,
    pub abs: f32,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { step: 1e-2, rel: 5e-3, abs: 1e-3 }
    }
}

/// Checks d f / d inputs against central differences; panics naming the first entry that
/// disagrees. `inputs` are (data, shape) pairs.
pub fn check_gradients(inputs: &[(Vec<f32>, Vec<usize>)], tol: Tolerance, f: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Tensor> = inputs.iter().map(|(d, s)| Tensor::variable(d, s)).collect();
    let out = f(&vars);
    assert_eq!(out.numel(), 1, "the checked function must return a scalar");
    let grads = backward(&out);
    for (k, (data, shape)) in inputs.iter().enumerate() {
        let analytic = grads
            .get(&vars[k])
            .map(|g| {
                assert_eq!(g.shape(), &shape[..], "gradient shape of input {k}");
                g.to_vec()
            })
            .unwrap_or_else(|| vec![0.0; data.len()]);
        for i in 0..data.len() {
            let eval = |delta: f32| {
                let mut d = data.clone();
                d[i] += delta;
                let ts: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(j, (dj, sj))| Tensor::from_vec(if j == k { &d } else { dj }, sj))
                    .collect();
                no_grad(|| f(&ts).item()) as f64
            };
            let numeric = ((eval(tol.step) - eval(-tol.step)) / (2.0 * tol.step as f64)) as f32;
            let a = analytic[i];
            let err = (a - numeric).abs();
            assert!(
                err <= tol.abs + tol.rel * a.abs().max(numeric.abs()),
                "input {k} entry {i}: analytic gradient {a}, finite differences {numeric}"
            );
        }
    }
}

/// A scalar that weighs every entry of `y` with a fixed pseudo-random weight, so that a
/// gradient check exercises every output position (sum(y * w)).
pub fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let w = Rng::new(seed).vec(y.numel(), -1.0, 1.0);
    y.mul(&Tensor::from_vec(&w, y.shape())).sum_all()
}

//! torch.nn.functional.linear: y = x W^T + b over the last axis, composed of the engine's matmul
//! (with the transpose folded into the kernel) and a broadcast bias add, so that both the forward
//! and the backward reuse existing kernels.

use crate::ops::matmul::matmul_t;
use crate::tensor::Tensor;

/// x [..., in], w [out, in], b [out] -> [..., out].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let &[out, inp] = w.shape() else { panic!("linear weight must be [out, in], got {:?}", w.shape()) };
    assert_eq!(x.shape().last(), Some(&inp), "linear input {:?} for weight {:?}", x.shape(), w.shape());
    let rows = x.numel() / inp;
    let y = matmul_t(&x.reshape(&[rows, inp]), w, false, true);
    let y = match b {
        Some(b) => {
            assert_eq!(b.numel(), out, "linear bias of shape {:?} for weight {:?}", b.shape(), w.shape());
            y.add(&b.reshape(&[out]))
        }
        None => y,
    };
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out;
    y.reshape(&shape)
}

/// CPU reference (f64 sums): x [rows, in], w [out, in], b [out].
pub mod cpu {
    pub fn linear(x: &[f32], w: &[f32], b: &[f32], [rows, inp, out]: [usize; 3]) -> Vec<f32> {
        (0..rows)
            .flat_map(|r| {
                (0..out).map(move |o| {
                    let s: f64 = (0..inp).map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64).sum();
                    (s + b[o] as f64) as f32
                })
            })
            .collect()
    }
}

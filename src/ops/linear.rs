//! torch.nn.functional.linear: y = x W^T + b over the last axis. Many rows, and rows selected by
//! a mask however few, take the tall matmul kernel with the bias added in its epilogue; otherwise
//! the engine's matmul (with the transpose folded into the kernel) and a broadcast bias add. The
//! backward reuses the matmul.

use crate::autograd::{Op, Saved};
use crate::ops::matmul::{self, matmul_t};
use crate::tensor::Tensor;

/// x `[..., in]`, w `[out, in]`, b `[out]` -> `[..., out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    linear_maybe_relu(x, w, b, false, false)
}

/// relu(linear(x, w, b)), the ReLU in the kernel's epilogue where the tall kernel takes it.
pub fn linear_relu(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    linear_maybe_relu(x, w, Some(b), true, false)
}

/// [`linear`] of rows selected by a mask (voxels), whose number changes from step to step: the
/// tall kernels take them, forward and backward, however few they are (where their shapes allow),
/// so that a training step makes the same launches and buffer requests for any number of rows.
pub fn linear_selected(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    linear_maybe_relu(x, w, Some(b), false, true)
}

/// [`linear_relu`] of rows selected by a mask (see [`linear_selected`]).
pub fn linear_relu_selected(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    linear_maybe_relu(x, w, Some(b), true, true)
}

fn linear_maybe_relu(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool, selected: bool) -> Tensor {
    let &[out, inp] = w.shape() else { panic!("linear weight must be [out, in], got {:?}", w.shape()) };
    assert_eq!(x.shape().last(), Some(&inp), "linear input {:?} for weight {:?}", x.shape(), w.shape());
    let rows = x.numel() / inp;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out;
    let tall = if selected {
        rows > 0 && matmul::tall_kernel_takes(inp, out)
    } else {
        matmul::tall_kernel_fits(rows, inp, out)
    };
    if let Some(b) = b
        && tall
        && matmul::each_fits(&[x.numel(), w.numel(), rows * out])
    {
        assert_eq!(b.numel(), out, "linear bias of shape {:?} for weight {:?}", b.shape(), w.shape());
        let (x2, b1) = (x.reshape(&[rows, inp]), b.reshape(&[out]));
        let epilogue = if relu { matmul::Rows::Relu } else { matmul::Rows::Plain };
        let y = matmul::tall(&x2, w, Some(&b1), [1, rows, out, inp], [0, 0], true, epilogue);
        let relu = relu.then(|| Saved::new(&y.detach()));
        return Tensor::with_op(y, Op::Linear { x: Saved::new(&x2), w: w.clone(), b: b1, relu, selected })
            .reshape(&shape);
    }
    let y = matmul_t(&x.reshape(&[rows, inp]), w, false, true);
    let y = match b {
        Some(b) => {
            assert_eq!(b.numel(), out, "linear bias of shape {:?} for weight {:?}", b.shape(), w.shape());
            y.add(&b.reshape(&[out]))
        }
        None => y,
    };
    let y = if relu { y.relu() } else { y };
    y.reshape(&shape)
}

/// CPU reference (f64 sums): x `[rows, in]`, w `[out, in]`, b `[out]`.
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

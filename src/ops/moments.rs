//! The moments of many rows from one pass over them: the Gram matrix and the column sums of rows
//! x [R, C] about a shift give the mean and covariance of x, and with them the mean and variance
//! of every affine map of x (a linear layer's output) without computing that map on every row.
//! The rows at an index come out of the same op, so that a model reading a few rows and the
//! statistics of all of them has one gradient into x.

use crate::autograd::{Op, Saved, no_grad};
use crate::ops::elementwise::{self as ew, UnaryOp};
use crate::ops::{layout, matmul};
use crate::tensor::Tensor;

/// `[C + 1 + K, C]` for rows x `[R, C]`, a shift `[C]` (a constant: it gets no gradient) and K row
/// indices (distinct): rows 0..C the Gram matrix sum_i (x_i - shift)^T (x_i - shift), row C the
/// column sums of x - shift, then the rows of x at `index`. The shift changes only the rounding:
/// one near the column means keeps the covariance accurate for columns with a large mean. With
/// `relu`, all of it of relu(x) (x the pre-activations of a ReLU that nothing else reads): the
/// ReLU applied where x is read, forward and backward.
pub fn gram_rows_at(x: &Tensor, shift: &Tensor, index: &Tensor, relu: bool) -> Tensor {
    let &[rows, c] = x.shape() else { panic!("gram_rows_at of {:?}: rows [R, C] expected", x.shape()) };
    assert_eq!(shift.numel(), c, "gram_rows_at shift {:?} for rows {:?}", shift.shape(), x.shape());
    let y = no_grad(|| {
        let (x, shift) = (x.detach(), shift.detach());
        // The tall-reduction kernel for any number of rows: they are a selection, and its
        // launches and buffers then do not change with their number.
        let (g, s) = if rows > 0 && matmul::tall_tn_takes(c, c) && matmul::each_fits(&[x.numel()]) {
            matmul::gram(&x, &shift, relu)
        } else {
            let d = if relu { x.relu() } else { x.clone() }.sub(&shift.reshape(&[1, c]));
            (matmul::matmul_t(&d, &d, true, false), crate::ops::reduce::column_sums(&d))
        };
        let mut parts = vec![g, s.reshape(&[1, c])];
        if index.numel() > 0 {
            let picked = x.gather_rows(index);
            parts.push(if relu { picked.relu() } else { picked });
        }
        Tensor::concat(&parts, 0)
    });
    let op = Op::GramRowsAt { x: Saved::new(x), shift: shift.detach(), index: index.clone(), relu };
    Tensor::with_op(y, op)
}

/// The gradient of x given dy [C + 1 + K, C] of [`gram_rows_at`]: (x_i - shift)(G + G^T) + g_s
/// on every row, plus the picked rows' gradients at theirs (with `relu`, of relu(x), then zero
/// where x is not positive).
pub(crate) fn gram_rows_at_grad(
    x: &Tensor,
    shift: &Tensor,
    index: &Tensor,
    dy: &Tensor,
    relu: bool,
) -> Tensor {
    let (rows, c) = (x.dim(0), x.dim(1));
    let g = dy.narrow(0, 0, c);
    let sym = g.add(&g.permute(&[1, 0]));
    // (x - shift) sym + g_s = x sym + (g_s - shift sym)
    let bias = dy.narrow(0, c, 1).sub(&shift.reshape(&[1, c]).matmul(&sym)).reshape(&[c]);
    let dx = if rows > 0 && matmul::tall_kernel_takes(c, c) && matmul::each_fits(&[x.numel()]) {
        let epilogue = if relu { matmul::Rows::ReluA } else { matmul::Rows::Plain };
        matmul::tall(x, &sym, Some(&bias), [1, rows, c, c], [0, 0], false, epilogue)
    } else if relu {
        let d = x.relu().matmul(&sym).add(&bias);
        ew::unary_grad(UnaryOp::Relu, x, x, &d)
    } else {
        x.matmul(&sym).add(&bias)
    };
    let k = index.numel();
    if k > 0 {
        let dk = dy.narrow(0, c + 1, k);
        let dk = if relu {
            let picked = x.gather_rows(index);
            ew::unary_grad(UnaryOp::Relu, &picked, &picked, &dk)
        } else {
            dk
        };
        layout::add_rows_into(&dk, index, &dx);
    }
    dx
}

/// CPU reference (f64 sums) of [`gram_rows_at`]: x [rows, c] row-major.
pub mod cpu {
    /// With `relu`, of relu(x).
    pub fn gram_rows_at(
        x: &[f32],
        shift: &[f32],
        index: &[u32],
        [rows, c]: [usize; 2],
        relu: bool,
    ) -> Vec<f32> {
        let v = |i: usize| if relu { x[i].max(0.0) } else { x[i] };
        let d = |i: usize, a: usize| v(i * c + a) as f64 - shift[a] as f64;
        let mut out = Vec::new();
        for a in 0..c {
            for b in 0..c {
                out.push((0..rows).map(|i| d(i, a) * d(i, b)).sum::<f64>() as f32);
            }
        }
        out.extend((0..c).map(|a| (0..rows).map(|i| d(i, a)).sum::<f64>() as f32));
        for &i in index {
            out.extend((i as usize * c..(i as usize + 1) * c).map(v));
        }
        out
    }
}

//! Data movement: permute, narrow (slice), concat, zero-padding along an axis, row gather and
//! its scatter-add gradient.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, split_at_axis, strides};
use crate::tensor::{DType, Tensor};

/// y[o, dst_start + j, i] = x[o, src_start + j, i] for j < len, along `axis` of both.
fn copy_axis(x: &Tensor, y: &Tensor, axis: usize, src_start: usize, dst_start: usize, len: usize) {
    let (outer, src_n, inner) = split_at_axis(x.shape(), axis);
    let dst_n = y.dim(axis);
    let n = outer * len * inner;
    let p =
        Params::new().u(n).u(0).u(outer).u(len).u(inner).u(src_n).u(src_start).u(dst_n).dims8(&[dst_start]);
    gpu().dispatch_1d(&Kernel::new("layout", "copy_axis"), p.bytes(), &[x.binding(), y.binding()], n as u64);
}

/// `x` zero-padded along `axis` to `size`, its data starting at `start` (the gradient of narrow).
pub(crate) fn pad_axis(x: &Tensor, axis: usize, start: usize, size: usize) -> Tensor {
    let mut shape = x.shape().to_vec();
    shape[axis] = size;
    let y = Tensor::zeros(&shape);
    copy_axis(x, &y, axis, 0, start, x.dim(axis));
    y
}

/// d(gather_rows)/dx: rows of `g` added into a zero [rows, cols] tensor at `index`.
pub(crate) fn scatter_add_rows(g: &Tensor, index: &Tensor, rows: usize) -> Tensor {
    let cols = g.numel() / g.dim(0).max(1);
    let mut shape = g.shape().to_vec();
    shape[0] = rows;
    let out = Tensor::zeros(&shape);
    let n = g.numel();
    let p = Params::new().u(n).u(0).u(g.dim(0)).u(cols);
    gpu().dispatch_1d(
        &Kernel::new("layout", "scatter_add_rows"),
        p.bytes(),
        &[g.binding(), index.binding(), out.binding()],
        n as u64,
    );
    out
}

impl Tensor {
    /// Axes reordered: result axis i is input axis perm[i].
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        assert_eq!(perm.len(), self.rank(), "permute {perm:?} of shape {:?}", self.shape());
        let st = strides(self.shape());
        let shape: Vec<usize> = perm.iter().map(|&p| self.dim(p)).collect();
        let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let out = Tensor::empty(&shape);
        let n = out.numel();
        let p = Params::new().u(n).u(shape.len()).u(0).u(0).u(0).u(0).u(0).u(0).dims8(&shape).dims8(&pst);
        gpu().dispatch_1d(
            &Kernel::new("layout", "permute"),
            p.bytes(),
            &[self.binding(), out.binding()],
            n as u64,
        );
        Tensor::with_op(out, Op::Permute { x: self.clone(), perm: perm.to_vec() })
    }

    /// The `len` entries of `axis` from `start` on.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Tensor {
        assert!(start + len <= self.dim(axis), "narrow {start}+{len} of axis {axis} of {:?}", self.shape());
        let mut shape = self.shape().to_vec();
        shape[axis] = len;
        let out = Tensor::empty(&shape);
        copy_axis(self, &out, axis, start, 0, len);
        Tensor::with_op(out, Op::Slice { x: self.clone(), axis, start })
    }

    /// Tensors joined along `axis`.
    pub fn concat(xs: &[Tensor], axis: usize) -> Tensor {
        assert!(!xs.is_empty(), "concat of nothing");
        let mut shape = xs[0].shape().to_vec();
        shape[axis] = xs.iter().map(|x| x.dim(axis)).sum();
        let out = Tensor::empty(&shape);
        let mut at = 0;
        for x in xs {
            let mut expect = shape.clone();
            expect[axis] = x.dim(axis);
            assert_eq!(x.shape(), &expect[..], "concat along {axis}: shapes differ");
            copy_axis(x, &out, axis, 0, at, x.dim(axis));
            at += x.dim(axis);
        }
        Tensor::with_op(out, Op::Concat { xs: xs.to_vec(), axis })
    }

    /// U32 vectors joined end to end (a byte copy: index bit patterns never pass through floats).
    pub fn concat_u32(xs: &[&Tensor]) -> Tensor {
        assert!(xs.iter().all(|x| x.dtype() == DType::U32 && x.rank() == 1), "concat_u32 of U32 vectors");
        let out = Tensor::empty_u32(&[xs.iter().map(|x| x.numel()).sum()]);
        let mut at = 0;
        for x in xs {
            gpu().copy(x.buffer(), 0, out.buffer(), at * 4, x.bytes());
            at += x.numel() as u64;
        }
        out
    }

    /// Rows (entries of axis 0) picked by a U32 index tensor.
    pub fn gather_rows(&self, index: &Tensor) -> Tensor {
        assert_eq!(index.dtype(), DType::U32, "gather_rows needs a U32 index");
        if self.dtype() == DType::U32 {
            assert_eq!(self.rank(), 1, "gather of U32 values needs a vector");
            let out = Tensor::empty_u32(&[index.numel()]);
            let n = index.numel();
            gpu().dispatch_1d(
                &Kernel::new("layout", "gather_u32"),
                Params::new().u(n).bytes(),
                &[self.binding(), index.binding(), out.binding()],
                n as u64,
            );
            return out;
        }
        let cols = self.numel() / self.dim(0).max(1);
        let mut shape = self.shape().to_vec();
        shape[0] = index.numel();
        let out = Tensor::empty(&shape);
        let n = out.numel();
        let p = Params::new().u(n).u(0).u(index.numel()).u(cols);
        gpu().dispatch_1d(
            &Kernel::new("layout", "gather_rows"),
            p.bytes(),
            &[self.binding(), index.binding(), out.binding()],
            n as u64,
        );
        Tensor::with_op(out, Op::GatherRows { x: self.clone(), index: index.clone() })
    }
}

/// CPU references for the tests.
pub mod cpu {
    use crate::ops::strides;

    pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
        let st = strides(shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let n = x.len();
        (0..n)
            .map(|i| {
                let (mut r, mut src) = (i, 0);
                for d in (0..out_shape.len()).rev() {
                    src += (r % out_shape[d]) * st[perm[d]];
                    r /= out_shape[d];
                }
                x[src]
            })
            .collect()
    }
}

//! Data movement: permute, narrow (slice), concat, zero-padding along an axis, row gather and
//! its scatter-add gradient.

use crate::autograd::Op;
use crate::gpu::Binding;
use crate::gpu::{Kernel, gpu};
use crate::ops::elementwise::collapse;
use crate::ops::{
    Overflow, Params, Tiling, align_elems, binding_limit, split_at_axis, strides, too_large, window,
};
use crate::tensor::{DType, Tensor};

/// Consecutive elements each invocation of the copy, gather and scatter kernels moves (COPY_RUN in
/// layout.wgsl), so that they share one invocation's index arithmetic.
const COPY_RUN: usize = 8;

/// y[y_base + sum_d i_d * ys[d]] = x[x_base + sum_d i_d * xs[d]] for every index i of `dims`,
/// launched over boxes whose footprints in x and y fit one binding each.
fn copy_box(
    x: &Tensor,
    x_base: usize,
    xs: &[usize],
    y: &Tensor,
    y_base: usize,
    ys: &[usize],
    dims: &[usize],
) {
    if dims.contains(&0) {
        return;
    }
    // Axes of length 1 move nothing; neighbours laid out alike in both merge.
    let keep: Vec<usize> = (0..dims.len()).filter(|&d| dims[d] > 1).collect();
    let (dims, xs, ys) = if keep.is_empty() {
        (vec![1], vec![0], vec![0])
    } else {
        let pick = |v: &[usize]| keep.iter().map(|&d| v[d]).collect::<Vec<_>>();
        collapse(&pick(dims), &pick(xs), &pick(ys))
    };
    let tiles = Tiling::new(&dims).tensor(&ys).tensor(&xs).split();
    let tiles =
        tiles.unwrap_or_else(|e| too_large("copy", if e.tensor == 0 { y } else { x }, &e, "one element"));
    let k = Kernel::new("layout", "copy");
    for t in tiles {
        let ((xb, xo), (yb, yo)) = (t.bind(x, x_base, &xs), t.bind(y, y_base, &ys));
        let last = t.len[dims.len() - 1];
        let n = t.count() / last * last.div_ceil(COPY_RUN);
        let p = Params::new().u(n).u(dims.len()).u(xo).u(yo).u(0).u(0).u(0).u(0);
        let p = p.dims8(&t.len).dims8(&xs).dims8(&ys);
        gpu().dispatch_1d(&k, p.bytes(), &[xb, yb], n as u64);
    }
}

/// y[o, dst_start + j, i] = x[o, src_start + j, i] for j < len, along `axis` of both.
fn copy_axis(x: &Tensor, y: &Tensor, axis: usize, src_start: usize, dst_start: usize, len: usize) {
    let (outer, src_n, inner) = split_at_axis(x.shape(), axis);
    let dst_n = y.dim(axis);
    let dims = [outer, len, inner];
    copy_box(
        x,
        src_start * inner,
        &[src_n * inner, inner, 1],
        y,
        dst_start * inner,
        &[dst_n * inner, inner, 1],
        &dims,
    );
}

/// One launch of a row gather or scatter-add: a box of rows of `rows` (one index each) against a
/// window of whole rows of the table.
struct RowLaunch<'a> {
    rows: Binding<'a>,
    index: Binding<'a>,
    table: Binding<'a>,
    params: Params,
    n: usize,
}

/// The launches that pair every box of `rows` (rows of `cols` elements indexed by `index`) that
/// fits one binding with every window of whole rows of `table` that does. Rows whose index falls
/// outside a launch's window skip it, so that every pair is visited once.
fn row_launches<'a>(
    op: &str,
    rows: &'a Tensor,
    index: &'a Tensor,
    table: &'a Tensor,
    cols: usize,
) -> Vec<RowLaunch<'a>> {
    if cols == 0 || index.numel() == 0 {
        return Vec::new();
    }
    let table_rows = table.numel() / cols;
    let per = ((binding_limit() / 4) as usize - (align_elems() - 1)) / cols;
    if per == 0 {
        too_large(op, table, &Overflow { tensor: 0, bytes: cols as u64 * 4 }, "one row");
    }
    let boxes = Tiling::new(&[index.numel(), cols]).tensor(&[cols, 1]).tensor(&[1, 0]).whole(1).split();
    let boxes = boxes.unwrap_or_else(|e| too_large(op, rows, &e, "one row"));
    let mut out = Vec::new();
    for b in &boxes {
        let ((rb, ro), (ib, io)) = (b.bind(rows, 0, &[cols, 1]), b.bind(index, 0, &[1, 0]));
        for first in (0..table_rows.max(1)).step_by(per) {
            let count = per.min(table_rows.max(1) - first);
            let (tb, to) = window(table, first * cols, count * cols);
            let n = b.len[0] * cols.div_ceil(COPY_RUN);
            let params = Params::new().u(n).u(0).u(ro).u(to).u(io).u(first).u(count).u(cols);
            out.push(RowLaunch { rows: rb, index: ib, table: tb, params, n });
        }
    }
    out
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
    let k = Kernel::new("layout", "scatter_add_rows");
    for l in row_launches("scatter_add_rows", g, index, &out, cols) {
        gpu().dispatch_1d(&k, l.params.bytes(), &[l.rows, l.index, l.table], l.n as u64);
    }
    out
}

/// Adds the rows of `src` into `out` at `index` (distinct row indices), in place.
pub(crate) fn add_rows_into(src: &Tensor, index: &Tensor, out: &Tensor) {
    let cols = src.numel() / src.dim(0).max(1);
    let k = Kernel::new("layout", "add_rows");
    for l in row_launches("add_rows", src, index, out, cols) {
        gpu().dispatch_1d(&k, l.params.bytes(), &[l.rows, l.index, l.table], l.n as u64);
    }
}

impl Tensor {
    /// Axes reordered: result axis i is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        assert_eq!(perm.len(), self.rank(), "permute {perm:?} of shape {:?}", self.shape());
        let st = strides(self.shape());
        let shape: Vec<usize> = perm.iter().map(|&p| self.dim(p)).collect();
        let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let out = Tensor::empty(&shape);
        copy_box(self, 0, &pst, &out, 0, &strides(&shape), &shape);
        Tensor::with_op(out, Op::Permute { x: self.graph_handle(), perm: perm.to_vec() })
    }

    /// The `len` entries of `axis` from `start` on.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Tensor {
        assert!(start + len <= self.dim(axis), "narrow {start}+{len} of axis {axis} of {:?}", self.shape());
        let mut shape = self.shape().to_vec();
        shape[axis] = len;
        let out = Tensor::empty(&shape);
        copy_axis(self, &out, axis, start, 0, len);
        Tensor::with_op(out, Op::Slice { x: self.graph_handle(), axis, start })
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
            if x.numel() > 0 {
                copy_axis(x, &out, axis, 0, at, x.dim(axis));
            }
            at += x.dim(axis);
        }
        Tensor::with_op(out, Op::Concat { xs: xs.iter().map(Tensor::graph_handle).collect(), axis })
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

    /// Rows (entries of axis 0) picked by a U32 index tensor (a U32 tensor must be a vector).
    pub fn gather_rows(&self, index: &Tensor) -> Tensor {
        assert_eq!(index.dtype(), DType::U32, "gather_rows needs a U32 index");
        let cols = self.numel() / self.dim(0).max(1);
        let mut shape = self.shape().to_vec();
        shape[0] = index.numel();
        let out = if self.dtype() == DType::U32 {
            assert_eq!(self.rank(), 1, "gather of U32 values needs a vector");
            Tensor::empty_u32(&shape)
        } else {
            Tensor::empty(&shape)
        };
        let k = Kernel::new("layout", "gather_rows");
        for l in row_launches("gather_rows", &out, index, self, cols) {
            gpu().dispatch_1d(&k, l.params.bytes(), &[l.table, l.index, l.rows], l.n as u64);
        }
        if self.dtype() == DType::U32 {
            return out;
        }
        Tensor::with_op(out, Op::GatherRows { x: self.graph_handle(), index: index.clone() })
    }
}

/// Rows `[K, C]` of an N, C, ... tensor x read across its channels: row k holds the C values of
/// voxel v = `index[k]` (U32, distinct) of the samples from `n0` on, flat in sample then voxel
/// order. `x.narrow(0, n0, ..)` with channels last, flattened to rows and gathered at `index`,
/// without the two copies before the gather (and their adjoints after the scatter).
pub fn gather_voxel_rows(x: &Tensor, n0: usize, index: &Tensor) -> Tensor {
    assert!(
        x.rank() >= 2 && x.dtype() == DType::F32,
        "gather_voxel_rows of {:?}: N, C, ... f32 expected",
        x.shape()
    );
    assert_eq!(index.dtype(), DType::U32, "gather_voxel_rows needs a U32 index");
    let (n, c) = (x.dim(0), x.dim(1));
    let v: usize = x.shape()[2..].iter().product();
    let k = index.numel();
    let fits = |t: &Tensor| t.numel() as u64 * 4 <= binding_limit();
    if !(fits(x) && fits(index) && (k * c) as u64 * 4 <= binding_limit()) {
        let mut perm: Vec<usize> = (0..x.rank()).collect();
        perm.remove(1);
        perm.push(1);
        let s = x.narrow(0, n0, n - n0).permute(&perm);
        return s.reshape(&[s.numel() / c, c]).gather_rows(index);
    }
    let out = Tensor::empty(&[k, c]);
    let p = voxel_params(k, n0 * c * v, v, c);
    gpu().dispatch_1d(
        &Kernel::new("layout", "gather_voxels"),
        p.bytes(),
        &[x.binding(), index.binding(), out.binding()],
        k as u64,
    );
    Tensor::with_op(out, Op::GatherVoxelRows { x: x.graph_handle(), n0, index: index.clone() })
}

fn voxel_params(rows: usize, base: usize, voxels: usize, channels: usize) -> Params {
    Params::new().u(rows).u(0).u(base).u(0).u(0).u(0).u(voxels).u(channels)
}

/// The gradient of [`gather_voxel_rows`]: `g` [K, C] written at the rows' voxels of a zero
/// tensor shaped as x.
pub(crate) fn scatter_voxel_rows(g: &Tensor, shape: &[usize], n0: usize, index: &Tensor) -> Tensor {
    let (c, v) = (shape[1], shape[2..].iter().product::<usize>());
    let out = Tensor::zeros(shape);
    let k = index.numel();
    let p = voxel_params(k, n0 * c * v, v, c);
    gpu().dispatch_1d(
        &Kernel::new("layout", "scatter_voxels"),
        p.bytes(),
        &[g.binding(), index.binding(), out.binding()],
        k as u64,
    );
    out
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

//! Reductions: sum and mean over axes, max and argmax along an axis, softmax and log-softmax
//! along an axis; the broadcasting helpers their gradients need.

use crate::autograd::Op;
use crate::gpu::{Binding, Kernel, gpu};
use crate::ops::{MAX_LOOP, Params, Tiling, split_at_axis, too_large};
use crate::tensor::Tensor;

/// Shortest chunk worth its own invocation.
const MIN_CHUNK: usize = 64;

/// How a tensor of a reduction is laid out: like x ([outer, r, inner]), or one value per lane
/// ([outer, chunks, inner]).
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Rows,
    Lane,
}
use Layout::{Lane, Rows};

/// Whether a launch may take part of a lane's rows.
#[derive(Clone, Copy)]
enum RowRuns {
    /// The kernel continues a lane from an earlier launch: rows go in runs of at most MAX_LOOP.
    Split,
    /// Every launch takes whole lanes, visiting their rows `passes` times.
    Whole { passes: usize },
}

/// x seen as [outer, r, inner], reduced by lanes (o, c, i) for c < chunks that each visit the
/// `chunk_len` rows from row c * chunk_len on.
struct Lanes {
    outer: usize,
    r: usize,
    inner: usize,
    chunks: usize,
    chunk_len: usize,
}

impl Lanes {
    fn whole(outer: usize, r: usize, inner: usize) -> Lanes {
        Lanes { outer, r, inner, chunks: 1, chunk_len: r }
    }

    /// Launches `kernel` over boxes of lanes whose footprints fit one binding each, `bindings` in
    /// the kernel's order. `per_row`: one invocation per row of each lane rather than per lane.
    fn launch(
        &self,
        op: &str,
        kernel: &Kernel,
        bindings: &[(&Tensor, Layout)],
        runs: RowRuns,
        per_row: bool,
    ) {
        let Lanes { outer, r, inner, chunks, chunk_len } = *self;
        let xs = [r * inner, chunk_len * inner, inner, 1];
        let ys = [chunks * inner, inner, 0, 1];
        let mut tiling = Tiling::new(&[outer, chunks, chunk_len, inner]);
        for &(_, layout) in bindings {
            tiling = tiling.tensor(if layout == Rows { &xs } else { &ys });
        }
        match runs {
            RowRuns::Split => tiling = tiling.at_most(2, MAX_LOOP),
            RowRuns::Whole { passes } => {
                assert!(
                    passes * chunk_len <= MAX_LOOP || !gpu().is_software(),
                    "{op} along an axis of {r} entries: this software device ends the loops of one shader \
                     invocation after {MAX_LOOP} iterations in all, {passes} passes over at most {} entries",
                    MAX_LOOP / passes
                );
                tiling = tiling.whole(2);
            }
        }
        let tiles =
            tiling.split().unwrap_or_else(|e| too_large(op, bindings[e.tensor].0, &e, "one lane's rows"));
        for t in tiles {
            let (mut x_off, mut y_off) = (0, 0);
            let b: Vec<Binding> = bindings
                .iter()
                .map(|&(tensor, layout)| {
                    let (b, off) = t.bind(tensor, 0, if layout == Rows { &xs } else { &ys });
                    *(if layout == Rows { &mut x_off } else { &mut y_off }) = off;
                    b
                })
                .collect();
            let [o, c, rows, i] = [t.len[0], t.len[1], t.len[2], t.len[3]];
            let p = Params::new().u(o).u(c).u(i).u(rows).u(xs[0]).u(xs[1]).u(xs[2]).u(ys[0]).u(ys[1]);
            let p = p.u(x_off).u(y_off).u(t.start[1] * chunk_len + t.start[2]).u(chunk_len).u(r);
            let p = p.u((t.start[2] > 0) as usize);
            let n = o * c * i * if per_row { rows } else { 1 };
            gpu().dispatch_1d(kernel, p.bytes(), &b, n as u64);
        }
    }
}

/// Sums x seen as [outer, r, inner] over r, giving [outer, inner] (as a flat tensor).
pub(crate) fn sum_middle(x: &Tensor, outer: usize, r: usize, inner: usize) -> Tensor {
    sum_middle_upto(x, outer, r, inner, r)
}

/// [`sum_middle`] for an r that varies from call to call up to `r_max`: it is split in chunks as
/// `r_max` would be (chunks past r sum to zero), so that every call makes the same launches and
/// temporaries whatever r is (a training step's buffer plan then holds from step to step).
pub(crate) fn sum_middle_upto(x: &Tensor, outer: usize, r: usize, inner: usize, r_max: usize) -> Tensor {
    assert!(r <= r_max, "sum over {r} rows, bounded by {r_max}");
    let lanes = outer * inner;
    // A reduction whose output is smaller than the adapter's fill splits its axis in chunks.
    let fill = gpu().fill_invocations();
    let chunks =
        if lanes < fill && r_max >= 2 * MIN_CHUNK { fill.div_ceil(lanes).min(r_max / MIN_CHUNK) } else { 1 };
    let chunk_len = r_max.div_ceil(chunks);
    let chunks = r_max.div_ceil(chunk_len);
    let out = Tensor::empty(&[outer * chunks * inner]);
    let l = Lanes { outer, r, inner, chunks, chunk_len };
    l.launch("sum", &Kernel::new("reduce", "sum_axis"), &[(x, Rows), (&out, Lane)], RowRuns::Split, false);
    if chunks > 1 { sum_middle(&out, outer, chunks, inner) } else { out }
}

/// The column sums [C] of x [rows, C], with the same launches and temporaries for any number of
/// rows (selected rows, whose number changes from step to step): the rows are split in as many
/// chunks as a long column would be.
pub(crate) fn column_sums(x: &Tensor) -> Tensor {
    let rows = x.dim(0);
    let c = x.numel() / rows.max(1);
    let chunks = gpu().fill_invocations().div_ceil(c.max(1));
    sum_middle_upto(x, 1, rows, c, rows.max(chunks * MIN_CHUNK))
}

/// Sum over `axes`, keeping them as size-1 dimensions.
pub fn sum_keepdim(x: &Tensor, axes: &[usize]) -> Tensor {
    let shape = x.shape().to_vec();
    let reduced: Vec<bool> = (0..shape.len()).map(|d| axes.contains(&d)).collect();
    let out_shape: Vec<usize> = shape.iter().zip(&reduced).map(|(&d, &r)| if r { 1 } else { d }).collect();
    // Runs of adjacent reduced (or kept) axes merge into one; reduce the runs one at a time.
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (&d, &r) in shape.iter().zip(&reduced) {
        match groups.last_mut() {
            Some((n, gr)) if *gr == r || d == 1 => *n *= d,
            _ => groups.push((d, r)),
        }
    }
    let mut cur: Option<Tensor> = None;
    let mut dims: Vec<usize> = groups.iter().map(|g| g.0).collect();
    for gi in 0..groups.len() {
        if groups[gi].1 && dims[gi] > 1 {
            let outer: usize = dims[..gi].iter().product();
            let inner: usize = dims[gi + 1..].iter().product();
            cur = Some(sum_middle(cur.as_ref().unwrap_or(x), outer, dims[gi], inner));
            dims[gi] = 1;
        }
    }
    // With nothing to reduce (every reduced axis has size 1) the sum is a copy.
    let out = cur.unwrap_or_else(|| expand_raw(x, x.shape()));
    Tensor::with_op(out.detach().reshape(&out_shape), Op::Sum { x: x.graph_handle() })
}

/// Sum over `axes`, dropping them.
pub fn sum_axes(x: &Tensor, axes: &[usize]) -> Tensor {
    let s = sum_keepdim(x, axes);
    let shape: Vec<usize> = (0..x.rank()).filter(|d| !axes.contains(d)).map(|d| x.dim(d)).collect();
    s.reshape(if shape.is_empty() { &[1] } else { &shape })
}

/// Broadcast copy of `x` to `shape` (numpy rules), without recording an op.
fn expand_raw(x: &Tensor, shape: &[usize]) -> Tensor {
    let out = Tensor::empty(shape);
    crate::ops::elementwise::broadcast(8, x, x, &out);
    out
}

/// The gradient of a keep-dim sum: `g` broadcast back to the input's shape.
pub(crate) fn expand_to(g: &Tensor, shape: &[usize]) -> Tensor {
    expand_raw(g, shape)
}

/// Sums a broadcast result's gradient back to the shape of the operand that was broadcast.
pub(crate) fn sum_to(g: &Tensor, shape: &[usize]) -> Tensor {
    if g.shape() == shape {
        return g.clone();
    }
    let off = g.rank() - shape.len();
    let axes: Vec<usize> =
        (0..g.rank()).filter(|&d| d < off || (shape[d - off] == 1 && g.dim(d) != 1)).collect();
    sum_keepdim(g, &axes).reshape(shape)
}

/// Max along `axis` (kept as size 1) and the index reaching it, as f32.
pub fn max_axis(x: &Tensor, axis: usize) -> (Tensor, Tensor) {
    let (outer, r, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = 1;
    let (out, arg) = (Tensor::empty(&shape), Tensor::empty(&shape));
    let k = Kernel::new("reduce", "max_axis");
    Lanes::whole(outer, r, inner).launch(
        "max_axis",
        &k,
        &[(x, Rows), (&out, Lane), (&arg, Lane)],
        RowRuns::Split,
        false,
    );
    let out = Tensor::with_op(out, Op::MaxAxis { x: x.graph_handle(), axis, arg: arg.clone() });
    (out, arg)
}

pub(crate) fn max_axis_grad(g: &Tensor, arg: &Tensor, shape: &[usize], axis: usize) -> Tensor {
    let (outer, r, inner) = split_at_axis(shape, axis);
    let out = Tensor::empty(shape);
    let k = Kernel::new("reduce", "max_grad");
    Lanes::whole(outer, r, inner).launch(
        "max_axis",
        &k,
        &[(g, Lane), (arg, Lane), (&out, Rows)],
        RowRuns::Split,
        true,
    );
    out
}

fn softmax_impl(x: &Tensor, axis: usize, log: bool) -> Tensor {
    let (outer, r, inner) = split_at_axis(x.shape(), axis);
    let out = Tensor::empty(x.shape());
    let k = Kernel::new("reduce", "softmax_axis").with("LOG", log as u8 as f64);
    Lanes::whole(outer, r, inner).launch(
        "softmax",
        &k,
        &[(x, Rows), (&out, Rows)],
        RowRuns::Whole { passes: 3 },
        false,
    );
    let y = out.detach();
    let op = if log {
        Op::LogSoftmax { x: x.graph_handle(), y, axis }
    } else {
        Op::Softmax { x: x.graph_handle(), y, axis }
    };
    Tensor::with_op(out, op)
}

pub(crate) fn softmax_grad(y: &Tensor, g: &Tensor, axis: usize, log: bool) -> Tensor {
    let (outer, r, inner) = split_at_axis(y.shape(), axis);
    let out = Tensor::empty(y.shape());
    let k = Kernel::new("reduce", "softmax_grad").with("LOG", log as u8 as f64);
    Lanes::whole(outer, r, inner).launch(
        "softmax",
        &k,
        &[(y, Rows), (g, Rows), (&out, Rows)],
        RowRuns::Whole { passes: 2 },
        false,
    );
    out
}

impl Tensor {
    /// Sum of every element, as a one-element tensor.
    pub fn sum_all(&self) -> Tensor {
        sum_axes(&self.reshape(&[self.numel()]), &[0])
    }
    pub fn mean_all(&self) -> Tensor {
        self.sum_all().mul_scalar(1.0 / self.numel() as f32)
    }
    /// Sum over `axes`; `keepdim` keeps them as size-1 dimensions.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Tensor {
        if keepdim { sum_keepdim(self, axes) } else { sum_axes(self, axes) }
    }
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Tensor {
        let n: usize = axes.iter().map(|&a| self.dim(a)).product();
        self.sum(axes, keepdim).mul_scalar(1.0 / n as f32)
    }
    /// Max along `axis`, kept as a size-1 dimension.
    pub fn max_axis(&self, axis: usize) -> Tensor {
        max_axis(self, axis).0
    }
    /// Index of the max along `axis` (the first on ties), as f32 values; no gradient.
    pub fn argmax(&self, axis: usize) -> Tensor {
        crate::autograd::no_grad(|| max_axis(self, axis).1)
    }
    pub fn softmax(&self, axis: usize) -> Tensor {
        softmax_impl(self, axis, false)
    }
    pub fn log_softmax(&self, axis: usize) -> Tensor {
        softmax_impl(self, axis, true)
    }
}

/// The two softmaxes of [`softmax_xent`]: (softmax(lv / t), softmax(la / t)) along axis 1.
fn xent_softmaxes(lv: &Tensor, la: &Tensor, temperature: f32) -> (Tensor, Tensor) {
    // One statement each: a temporary lives to the end of its statement.
    let cv = lv.mul_scalar(1.0 / temperature).softmax(1);
    let ca = la.mul_scalar(1.0 / temperature).softmax(1);
    (cv, ca)
}

/// The sums of the rows of x [rows, cols], [rows, 1], each by one lane: the same launches and
/// temporaries for any number of rows (a split of the rows' sums adds a pass when there are
/// fewer rows than the adapter's fill).
fn row_sums(x: &Tensor) -> Tensor {
    let (rows, cols) = (x.dim(0), x.dim(1));
    let out = Tensor::empty(&[rows, 1]);
    let k = Kernel::new("reduce", "sum_axis");
    Lanes::whole(rows, cols, 1).launch("sum", &k, &[(x, Rows), (&out, Lane)], RowRuns::Split, false);
    out
}

/// `sum(-softmax(la / t) * log(softmax(lv / t) + eps)) / rows` for logits lv, la [rows, cols]:
/// the cross-entropy of one correlation matrix against another, gradients into both. Only the
/// logits are saved; the [rows, cols] softmaxes and their logarithm live during the forward and
/// again during the backward, never in between. With rows at most `max_rows`, every call makes
/// the same launches and temporaries (for matrices whose rows are selected voxels).
pub fn softmax_xent(lv: &Tensor, la: &Tensor, temperature: f32, eps: f32, max_rows: usize) -> Tensor {
    assert!(lv.rank() == 2 && lv.shape() == la.shape(), "softmax_xent: logits {lv:?} and {la:?}");
    let rows = lv.dim(0);
    let loss = crate::autograd::no_grad(|| {
        let (cv, ca) = xent_softmaxes(lv, la, temperature);
        let shifted = cv.add_scalar(eps);
        drop(cv);
        let log = shifted.log();
        drop(shifted);
        let prod = ca.mul(&log);
        drop((ca, log));
        let per_row = row_sums(&prod);
        drop(prod);
        sum_middle_upto(&per_row, 1, rows, 1, max_rows.max(rows)).mul_scalar(-1.0 / rows as f32)
    });
    Tensor::with_op(loss, Op::SoftmaxXent { lv: lv.clone(), la: la.clone(), temperature, eps })
}

/// Gradients (d lv, d la) of [`softmax_xent`] given the loss's gradient `g` [1]. With
/// cv, ca the softmaxes and s = g / (t rows): d la = s ca (rowsum(ca log(cv + eps)) - log(cv + eps)),
/// and with q = -ca cv / (cv + eps): d lv = s (q - cv rowsum(q)).
pub(crate) fn softmax_xent_grad(
    lv: &Tensor,
    la: &Tensor,
    temperature: f32,
    eps: f32,
    g: &Tensor,
) -> (Tensor, Tensor) {
    let s = g.reshape(&[1, 1]).mul_scalar(1.0 / (temperature * lv.dim(0) as f32));
    let (cv, ca) = xent_softmaxes(lv, la, temperature);
    // Written so that at most five [rows, cols] matrices are alive at once: this runs first in
    // the backward pass, when every saved activation of the network is still held.
    let da = {
        let shifted = cv.add_scalar(eps);
        let log = shifted.log();
        drop(shifted);
        let row = row_sums(&ca.mul(&log));
        let diff = row.sub(&log);
        drop(log);
        let scaled = ca.mul(&diff);
        drop(diff);
        scaled.mul(&s)
    };
    let q = {
        let prod = ca.mul(&cv);
        drop(ca);
        let shifted = cv.add_scalar(eps);
        let ratio = prod.div(&shifted);
        drop((prod, shifted));
        ratio.neg()
    };
    let row = row_sums(&q);
    let dv = q.sub(&cv.mul(&row));
    drop((q, cv));
    let dv = dv.mul(&s);
    (dv, da)
}

/// CPU references (f64 accumulation) for the tests.
pub mod cpu {
    use crate::ops::split_at_axis;

    pub fn sum_axis(x: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
        let (outer, r, inner) = split_at_axis(shape, axis);
        let mut out = vec![0f32; outer * inner];
        for o in 0..outer {
            for i in 0..inner {
                let s: f64 = (0..r).map(|k| x[(o * r + k) * inner + i] as f64).sum();
                out[o * inner + i] = s as f32;
            }
        }
        out
    }

    pub fn max_axis(x: &[f32], shape: &[usize], axis: usize) -> (Vec<f32>, Vec<f32>) {
        let (outer, r, inner) = split_at_axis(shape, axis);
        let mut vals = vec![0f32; outer * inner];
        let mut args = vec![0f32; outer * inner];
        for o in 0..outer {
            for i in 0..inner {
                let mut best = (x[o * r * inner + i], 0);
                for k in 1..r {
                    let v = x[(o * r + k) * inner + i];
                    if v > best.0 {
                        best = (v, k);
                    }
                }
                vals[o * inner + i] = best.0;
                args[o * inner + i] = best.1 as f32;
            }
        }
        (vals, args)
    }

    pub fn softmax(x: &[f32], shape: &[usize], axis: usize, log: bool) -> Vec<f32> {
        let (outer, r, inner) = split_at_axis(shape, axis);
        let mut out = vec![0f32; x.len()];
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| (o * r + k) * inner + i;
                let m = (0..r).map(|k| x[at(k)] as f64).fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..r).map(|k| (x[at(k)] as f64 - m).exp()).sum();
                for k in 0..r {
                    let z = x[at(k)] as f64 - m;
                    out[at(k)] = if log { (z - s.ln()) as f32 } else { (z.exp() / s) as f32 };
                }
            }
        }
        out
    }
}

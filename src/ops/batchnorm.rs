//! BatchNorm over axis 1 (BatchNorm3d on [N, C, X, Y, Z], BatchNorm1d on [rows, C]), PyTorch
//! semantics, optionally fused with the ReLU that follows it in every block of the network.
//!
//! Training mode normalizes with the batch mean and biased variance and updates the running
//! statistics in place with the unbiased variance (`running = (1 - momentum) * running + momentum *
//! batch`), counting `num_batches_tracked`; evaluation mode normalizes with the running statistics.
//! The backward goes through the batch statistics in training mode.

use crate::autograd::{Op, Saved};
use crate::gpu::{Binding, Kernel, gpu};
use crate::ops::{Params, plane_groups, range_binding};
use crate::tensor::{DType, Tensor};

/// Elements of one channel reduced by one workgroup (256 invocations x 64): long enough that the
/// workgroup's merge tree is a small part of its work.
const BLOCK: usize = 16384;

/// The kernel `entry`, its twin over four vec4s of a channel per step when `inner` is a multiple
/// of 16, its vec4 twin when a vec4 never straddles two channels, or its channels-last twin for
/// rows of a multiple of 4 channels (BatchNorm1d).
fn kernel(entry: &'static str, c: usize, inner: usize) -> Kernel {
    const TWINS: [(&str, &str, &str, &str); 4] = [
        ("stats_partial", "stats_partial16", "stats_partial4", "stats_partial_rows4"),
        ("normalize", "normalize16", "normalize4", "normalize_rows4"),
        ("grad_partial", "grad_partial16", "grad_partial4", "grad_partial_rows4"),
        ("grad_input", "grad_input16", "grad_input4", "grad_input_rows4"),
    ];
    let twins = TWINS.iter().find(|(e, ..)| *e == entry);
    let name = match twins {
        Some((_, v16, ..)) if inner.is_multiple_of(16) => v16,
        Some((_, _, v4, _)) if inner.is_multiple_of(4) => v4,
        Some((.., rows4)) if rows_layout(c, inner) => rows4,
        _ => entry,
    };
    Kernel::new("batchnorm", name)
}

/// A per-channel reduction's kernel `entry` (a twin as [`kernel`] picks it) with its workgroup size;
/// the channels-last twins keep theirs (256: each workgroup covers every channel of its rows).
fn reduction_kernel(entry: &'static str, c: usize, inner: usize) -> Kernel {
    let k = kernel(entry, c, inner);
    if k.entry.ends_with("rows4") { k } else { k.with("WG", reduction_workgroup() as f64) }
}

/// Rows of channels (inner 1) in groups of four, at most 256 groups: the channels-last kernels.
fn rows_layout(c: usize, inner: usize) -> bool {
    inner == 1 && c.is_multiple_of(4) && c <= 1024
}

/// Rows reduced by one workgroup of the channels-last reductions (all channels of each row).
const ROWS_BLOCK: usize = 2048;

/// Elements of one channel that one workgroup of a reduction covers.
fn block_len(c: usize, inner: usize) -> usize {
    if rows_layout(c, inner) { ROWS_BLOCK } else { BLOCK }
}

/// Rows per invocation of the channels-last per-element kernels (ROWS in the shader).
const ROWS: usize = 4;

/// A BatchNorm layer's affine parameters and running statistics (updated in place in training).
pub struct BatchNormState<'a> {
    /// `[C]`
    pub weight: &'a Tensor,
    /// `[C]`
    pub bias: &'a Tensor,
    /// `[C]`
    pub running_mean: &'a Tensor,
    /// `[C]`
    pub running_var: &'a Tensor,
    /// One U32 counter.
    pub num_batches_tracked: &'a Tensor,
    pub momentum: f32,
    pub eps: f32,
}

/// x as [outer, C, inner].
fn dims(x: &Tensor) -> (usize, usize, usize) {
    assert!(x.rank() >= 2, "batch_norm needs [N, C, ...], got {:?}", x.shape());
    (x.dim(0), x.dim(1), x.shape()[2..].iter().product())
}

/// The parameter block of every launch; `outer` and `block0` vary per run of samples.
struct Launch {
    outer: usize,
    c: usize,
    inner: usize,
    block0: usize,
    total_blocks: usize,
    m: usize,
    momentum: f32,
    eps: f32,
}

impl Launch {
    fn params(&self) -> Params {
        Params::new()
            .u(self.outer)
            .u(self.c)
            .u(self.inner)
            .u(block_len(self.c, self.inner))
            .u(self.block0)
            .u(self.total_blocks)
            .u(self.m)
            .f(self.momentum)
            .f(self.eps)
    }
}

/// Runs of samples that fit one binding, with their first block index among a channel's blocks.
fn runs(outer: usize, c: usize, inner: usize) -> (Vec<(usize, usize, usize)>, usize) {
    let mut block0 = 0;
    let runs = plane_groups(outer, &[c * inner])
        .into_iter()
        .map(|(o0, count)| {
            let r = (o0, count, block0);
            block0 += (count * inner).div_ceil(block_len(c, inner));
            r
        })
        .collect();
    (runs, block0)
}

thread_local! {
    static REDUCTION_WORKGROUP: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the per-channel reductions in workgroups of `invocations` (a power of two up to
/// 256) instead of the adapter's default (tests, benchmarks).
pub fn with_reduction_workgroup<R>(invocations: usize, f: impl FnOnce() -> R) -> R {
    assert!(invocations.is_power_of_two() && invocations <= 256, "{invocations} invocations per workgroup");
    crate::autograd::with_flag(&REDUCTION_WORKGROUP, Some(invocations), f)
}

/// Invocations per workgroup of the per-channel reductions (`stats_partial*`, `grad_partial*`):
/// 256 on GPUs; 32 on software devices, where every barrier of the merge tree is a pass over the
/// workgroup's invocations (on llvmpipe the small preset's partial reductions took 123 ms of a
/// step in workgroups of 256, 67 ms in workgroups of 32; the deepest levels' channels, a few
/// hundred values each, cost half as much).
fn reduction_workgroup() -> usize {
    REDUCTION_WORKGROUP.with(|c| c.get()).unwrap_or_else(|| if gpu().is_software() { 32 } else { 256 })
}

/// A per-channel reduction with bindings (full-size tensors..., per-channel tensors..., partials):
/// one partial per block of `BLOCK` elements of a channel, [C, blocks, 4].
fn reduce_blocks(kernel: &Kernel, full: &[&Tensor], channel: &[&Tensor], base: &Launch) -> Tensor {
    let (outer, c, inner) = (base.outer, base.c, base.inner);
    let plane = c * inner;
    let (runs, total_blocks) = runs(outer, c, inner);
    let part = Tensor::empty(&[c, total_blocks, 4]);
    for &(o0, count, block0) in &runs {
        let l = Launch { outer: count, block0, total_blocks, ..*base };
        let blocks = (count * inner).div_ceil(block_len(c, inner));
        let mut b: Vec<Binding> = full.iter().map(|t| range_binding(t, o0 * plane, count * plane)).collect();
        b.extend(channel.iter().map(|t| t.binding()));
        b.push(part.binding());
        // The channels-last kernels cover every channel in each workgroup.
        let groups = if rows_layout(c, inner) { 1 } else { c };
        gpu().dispatch(kernel, l.params().bytes(), &b, [blocks as u32, groups as u32, 1]);
    }
    part
}

/// Applies a per-element kernel with bindings (x, [dy], per-channel tensors..., out) over runs.
fn per_element(kernel: &Kernel, full: &[&Tensor], channel: &[&Tensor], out: &Tensor, base: &Launch) {
    let plane = base.c * base.inner;
    for (o0, count) in plane_groups(base.outer, &[plane]) {
        let l = Launch { outer: count, ..*base };
        let mut b: Vec<Binding> = full.iter().map(|t| range_binding(t, o0 * plane, count * plane)).collect();
        b.extend(channel.iter().map(|t| t.binding()));
        b.push(range_binding(out, o0 * plane, count * plane));
        let lanes = if kernel.entry.ends_with("rows4") {
            base.c / 4 * count.div_ceil(ROWS)
        } else if kernel.entry.ends_with("16") {
            count * plane / 16
        } else if kernel.entry.ends_with('4') {
            count * plane / 4
        } else {
            count * plane
        };
        gpu().dispatch_1d(kernel, l.params().bytes(), &b, lanes as u64);
    }
}

/// BatchNorm over axis 1 of x ([N, C, ...]), then ReLU when `relu`; training mode uses and
/// updates batch statistics.
pub fn batch_norm(x: &Tensor, s: &BatchNormState, train: bool, relu: bool) -> Tensor {
    let (outer, c, inner) = dims(x);
    for (name, t) in [("weight", s.weight), ("bias", s.bias), ("running_mean", s.running_mean)] {
        assert_eq!(t.numel(), c, "batch_norm {name} of shape {:?} for {c} channels", t.shape());
    }
    assert_eq!(s.running_var.numel(), c, "batch_norm running_var for {c} channels");
    assert_eq!(s.num_batches_tracked.dtype(), DType::U32, "num_batches_tracked is a U32 counter");
    let m = outer * inner;
    let base = Launch { outer, c, inner, block0: 0, total_blocks: 0, m, momentum: s.momentum, eps: s.eps };
    let stats = if train {
        assert!(m > 1, "batch_norm in training needs more than one value per channel, got {:?}", x.shape());
        let part = reduce_blocks(&reduction_kernel("stats_partial", c, inner), &[x], &[], &base);
        finalize_stats(&part, s, &Launch { total_blocks: part.dim(1), ..base })
    } else {
        let stats = Tensor::empty(&[c, 4]);
        gpu().dispatch_1d(
            &Kernel::new("batchnorm", "stats_running"),
            base.params().bytes(),
            &[
                s.weight.binding(),
                s.bias.binding(),
                s.running_mean.binding(),
                s.running_var.binding(),
                stats.binding(),
            ],
            c as u64,
        );
        stats
    };
    let y = normalize(x, &stats, relu);
    let op = Op::BatchNorm {
        x: Saved::new(x),
        weight: s.weight.clone(),
        bias: s.bias.clone(),
        stats: stats.detach(),
        train,
        relu,
    };
    Tensor::with_op(y, op)
}

/// (x - mean) * invstd * weight + bias per channel with `stats` [C, 4] = (mean, invstd,
/// weight * invstd, bias), then ReLU when `relu`: the forward's output, and the same values again
/// when a backward rule recomputes them.
pub(crate) fn normalize(x: &Tensor, stats: &Tensor, relu: bool) -> Tensor {
    let (outer, c, inner) = dims(x);
    let base =
        Launch { outer, c, inner, block0: 0, total_blocks: 0, m: outer * inner, momentum: 0.0, eps: 0.0 };
    let y = Tensor::empty(x.shape());
    per_element(&kernel("normalize", c, inner).with("RELU", relu as u8 as f64), &[x], &[stats], &y, &base);
    y
}

/// Merges the (count, mean, M2) blocks `part` [C, blocks] of every channel into the batch
/// statistics (mean, invstd, weight * invstd, bias) and moves the running statistics.
fn finalize_stats(part: &Tensor, s: &BatchNormState, l: &Launch) -> Tensor {
    let c = l.c;
    let stats = Tensor::empty(&[c, 4]);
    let (entry, groups) = finalize_launch("stats_finalize_seq", "stats_finalize", c, l.total_blocks);
    gpu().dispatch(
        &Kernel::new("batchnorm", entry),
        l.params().bytes(),
        &[
            part.binding(),
            s.weight.binding(),
            s.bias.binding(),
            stats.binding(),
            s.running_mean.binding(),
            s.running_var.binding(),
            s.num_batches_tracked.binding(),
        ],
        groups,
    );
    stats
}

/// Whether a finalize kernel takes its `_seq` twin, one invocation per channel walking its blocks,
/// rather than a workgroup reduction per channel: where there are few blocks. A loop of a few
/// dependent loads is short on a GPU too; on software devices, where the reduction's barriers
/// cost more than loads, the loop wins up to many more blocks.
fn sequential(total_blocks: usize) -> bool {
    total_blocks <= if gpu().is_software() { 256 } else { 8 }
}

/// The finalize kernel's entry among (`seq`, `full`) and its workgroups for `c` channels.
fn finalize_launch(
    seq: &'static str,
    full: &'static str,
    c: usize,
    total_blocks: usize,
) -> (&'static str, [u32; 3]) {
    if sequential(total_blocks) { (seq, [c.div_ceil(64) as u32, 1, 1]) } else { (full, [c as u32, 1, 1]) }
}

/// The running statistics moved as a training-mode forward over `rows` rows whose batch mean
/// is `mean` `[C]` and biased variance `var` `[C]` would move them (num_batches_tracked too), for
/// statistics known without the rows themselves.
pub fn update_running_stats(s: &BatchNormState, mean: &Tensor, var: &Tensor, rows: usize) {
    let c = s.weight.numel();
    assert!(rows > 1, "batch_norm in training needs more than one row, got {rows}");
    assert!(
        mean.numel() == c && var.numel() == c,
        "statistics {:?} and {:?} for {c} channels",
        mean.shape(),
        var.shape()
    );
    // One (count, mean, M2) block per channel, as the statistics' partial sums give them.
    let n = rows as f32;
    let col = |t: Tensor| t.reshape(&[c, 1]);
    let part = crate::autograd::no_grad(|| {
        Tensor::concat(
            &[
                col(Tensor::full(&[c], n)),
                col(mean.detach()),
                col(var.detach().mul_scalar(n)),
                col(Tensor::zeros(&[c])),
            ],
            1,
        )
    });
    let l = Launch {
        outer: rows,
        c,
        inner: 1,
        block0: 0,
        total_blocks: 1,
        m: rows,
        momentum: s.momentum,
        eps: s.eps,
    };
    finalize_stats(&part, s, &l);
}

/// Gradients of x, weight and bias given dy; `stats` are the forward's per-channel
/// (mean, invstd, weight * invstd, bias).
pub fn batch_norm_grad(
    x: &Tensor,
    weight: &Tensor,
    stats: &Tensor,
    dy: &Tensor,
    train: bool,
    relu: bool,
) -> [Tensor; 3] {
    let (outer, c, inner) = dims(x);
    let base =
        Launch { outer, c, inner, block0: 0, total_blocks: 0, m: outer * inner, momentum: 0.0, eps: 0.0 };
    let relu_k = relu as u8 as f64;
    let part = reduce_blocks(
        &reduction_kernel("grad_partial", c, inner).with("RELU", relu_k),
        &[x, dy],
        &[stats],
        &base,
    );
    let (coef, dweight, dbias) = (Tensor::empty(&[c, 4]), Tensor::empty(&[c]), Tensor::empty(&[c]));
    let l = Launch { total_blocks: part.dim(1), ..base };
    let (entry, groups) = finalize_launch("grad_finalize_seq", "grad_finalize", c, l.total_blocks);
    gpu().dispatch(
        &Kernel::new("batchnorm", entry).with("TRAIN", train as u8 as f64),
        l.params().bytes(),
        &[
            part.binding(),
            weight.binding(),
            stats.binding(),
            coef.binding(),
            dweight.binding(),
            dbias.binding(),
        ],
        groups,
    );
    let dx = Tensor::empty(x.shape());
    per_element(&kernel("grad_input", c, inner).with("RELU", relu_k), &[x, dy], &[&coef, stats], &dx, &base);
    [dx, dweight.reshape(weight.shape()), dbias.reshape(weight.shape())]
}

/// CPU references (f64 arithmetic) for the tests.
pub mod cpu {
    /// Per-channel (mean, biased variance) of x as [outer, C, inner].
    pub fn stats(x: &[f32], shape: &[usize]) -> Vec<(f64, f64)> {
        let (outer, c, inner) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
        (0..c)
            .map(|ch| {
                let vals = (0..outer).flat_map(|o| (0..inner).map(move |i| (o * c + ch) * inner + i));
                let m = (outer * inner) as f64;
                let mean = vals.clone().map(|k| x[k] as f64).sum::<f64>() / m;
                let var = vals.map(|k| (x[k] as f64 - mean).powi(2)).sum::<f64>() / m;
                (mean, var)
            })
            .collect()
    }

    /// The forward; returns y and the updated (running_mean, running_var) in training mode.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        x: &[f32],
        shape: &[usize],
        weight: &[f32],
        bias: &[f32],
        running: (&[f32], &[f32]),
        train: bool,
        momentum: f64,
        eps: f64,
        relu: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (c, inner) = (shape[1], shape[2..].iter().product::<usize>());
        let m = (x.len() / c) as f64;
        let batch = stats(x, shape);
        let used: Vec<(f64, f64)> = if train {
            batch.clone()
        } else {
            running.0.iter().zip(running.1).map(|(&a, &b)| (a as f64, b as f64)).collect()
        };
        let y = x
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                let ch = (k / inner) % c;
                let (mean, var) = used[ch];
                let y = (v as f64 - mean) / (var + eps).sqrt() * weight[ch] as f64 + bias[ch] as f64;
                (if relu { y.max(0.0) } else { y }) as f32
            })
            .collect();
        let (mut rm, mut rv) = (running.0.to_vec(), running.1.to_vec());
        if train {
            for ch in 0..c {
                let (mean, var) = batch[ch];
                rm[ch] = ((1.0 - momentum) * rm[ch] as f64 + momentum * mean) as f32;
                rv[ch] = ((1.0 - momentum) * rv[ch] as f64 + momentum * var * m / (m - 1.0)) as f32;
            }
        }
        (y, rm, rv)
    }

    /// (dx, dweight, dbias) given dy, with the statistics the forward used.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        x: &[f32],
        shape: &[usize],
        weight: &[f32],
        bias: &[f32],
        running: (&[f32], &[f32]),
        dy: &[f32],
        train: bool,
        eps: f64,
        relu: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (c, inner) = (shape[1], shape[2..].iter().product::<usize>());
        let m = (x.len() / c) as f64;
        let used: Vec<(f64, f64)> = if train {
            stats(x, shape)
        } else {
            running.0.iter().zip(running.1).map(|(&a, &b)| (a as f64, b as f64)).collect()
        };
        let ch = |k: usize| (k / inner) % c;
        let xhat = |k: usize| {
            let (mean, var) = used[ch(k)];
            (x[k] as f64 - mean) / (var + eps).sqrt()
        };
        // The gradient reaching the normalized value (zero where ReLU clipped).
        let g: Vec<f64> = (0..x.len())
            .map(|k| {
                let pre = xhat(k) * weight[ch(k)] as f64 + bias[ch(k)] as f64;
                if relu && pre <= 0.0 { 0.0 } else { dy[k] as f64 }
            })
            .collect();
        let (mut sdy, mut sdx) = (vec![0f64; c], vec![0f64; c]);
        for k in 0..x.len() {
            sdy[ch(k)] += g[k];
            sdx[ch(k)] += g[k] * xhat(k);
        }
        let dx = (0..x.len())
            .map(|k| {
                let (_, var) = used[ch(k)];
                let kk = weight[ch(k)] as f64 / (var + eps).sqrt();
                let d = if train { g[k] - sdy[ch(k)] / m - xhat(k) * sdx[ch(k)] / m } else { g[k] };
                (kk * d) as f32
            })
            .collect();
        (dx, sdx.iter().map(|&v| v as f32).collect(), sdy.iter().map(|&v| v as f32).collect())
    }
}

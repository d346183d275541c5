//! 3D convolution (PyTorch Conv3d: cross-correlation plus bias) and the kernel-2 stride-2
//! transposed convolution of the decoder, forward and backward; layout N, C, X, Y, Z.
//!
//! Two forms cover the six kernels:
//! - gather (shaders/conv3d.wgsl), per axis with r the output parity class:
//!   `dst[n, o, q*os + r] = bias[o] + sum_i sum_d src[n, i, q*S + d + off_r] * W_r[o, i, d]`.
//!   conv3d's forward is one class with the weights; its input gradient the same over the
//!   output gradient with flipped, transposed weights, split by output parity when the stride
//!   is 2; conv_transpose3d's forward is eight 1x1 classes (one per output parity), its input
//!   gradient a k2 s2 convolution. `Prep` rearranges the weights for each.
//! - wgrad (shaders/conv3d_grad.wgsl), summed over chunks of the (n, q) domain:
//!   `dW[a, b, t] = sum_n sum_q A[n, a, q] * B[n, b, q*S + t + off]`. conv3d's weight gradient
//!   with A = output gradient, B = input; conv_transpose3d's with A = input, B = output gradient.
//!
//! Each form has two kernel families, both checked against `cpu`:
//! - `Algo::Subgroup`: register tiles of 8 subgroup lanes. Each lane loads a different element
//!   and the tile shares them through subgroup shuffles, which cost about one FMA on the
//!   software device, where a storage load costs tens: weights (gather) or B rows (wgrad) are
//!   read once per 8 lanes, and a row of inputs once for all kernel taps along z. Their WGSL is
//!   generated per (kernel size, stride, tile) with every tap unrolled into scalar registers:
//!   loops over register arrays run three to four times slower there. The k2 s2 transposed
//!   convolution (`Form::Up`) has its own generated kernel computing the eight output parities
//!   of an input voxel together. Where the tensors' rows along z are whole vectors (`Algo`'s
//!   `z`), tiles read or write them as vec2 or vec4, which cost there about what one scalar
//!   access does; the k2 s2 kernels then also read the weights in place, as vec4s (`down_sg`
//!   for the k2 s2 convolution without padding, `upv_sg` for the transposed one).
//! - `Algo::Tiled`: the workgroup-memory implicit GEMM of GPUs, tile sizes as override
//!   constants.
//!
//! `Algo` is chosen per shape bucket by timing the adapter's candidates once per process
//! (`autotune`; on a software device with subgroups only the subgroup kernels, whose memory
//! model it rewards), or forced with `with_algo` (tests, benchmarks). `CAML_CONV_TUNE_FILE`
//! (default: `conv_tune.tsv` in the pipeline cache folder) keeps the choices across processes,
//! `CAML_CONV_NO_TUNE` takes the first candidate.
//!
//! Tensors over the storage binding limit are bound one sample per launch; a sample over the
//! limit panics naming the shape.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::autograd::{Op, Saved};
use crate::gpu::{Binding, Kernel, gpu};
use crate::ops::Params;
use crate::tensor::Tensor;

mod bench;
mod generate;

pub use bench::{
    BenchCase, BenchPreset, BenchRow, Pass, bench_cases, bench_conv_kernels, bench_operands, bench_pass,
};
use generate::{
    sg_down_shader, sg_gather_shader, sg_gather_vec_shader, sg_up_shader, sg_up_vec_shader, sg_wgrad_shader,
    sg_wgrad_vec_shader,
};
pub use generate::{
    sg_down_source, sg_gather_source, sg_gather_vec_source, sg_up_source, sg_up_vec_source, sg_wgrad_source,
    sg_wgrad_vec_source,
};

// ---- public API ----------------------------------------------------------------------------

/// x `[N, Cin, X, Y, Z]`, w `[Cout, Cin, k, k, k]`, b `[Cout]` -> `[N, Cout, X', Y', Z']` with
/// X' = (X + 2 padding - k) / stride + 1.
pub fn conv3d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Tensor {
    conv3d_op(x, w, b, stride, padding, false)
}

/// [`conv3d`] whose output feeds a BatchNorm in training mode: the same values, and a bias
/// gradient of zero without a pass over the output gradient (the batch mean that BatchNorm
/// subtracts holds the bias, so the loss does not depend on it).
pub fn conv3d_before_batchnorm(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Tensor {
    conv3d_op(x, w, b, stride, padding, true)
}

fn conv3d_op(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
    bias_cancels: bool,
) -> Tensor {
    let (xs, ws) = (dims5(x, "conv3d input"), dims5(w, "conv3d weight"));
    let k = ws[2];
    assert!(ws[2] == ws[3] && ws[3] == ws[4], "conv3d weight {ws:?}: cubic kernels only");
    assert_eq!(xs[1], ws[1], "conv3d: input {xs:?} and weight {ws:?} disagree on input channels");
    assert_eq!(b.shape(), &[ws[0]], "conv3d: bias {:?} for {} output channels", b.shape(), ws[0]);
    assert!((1..=2).contains(&stride), "conv3d: stride {stride} (1 or 2 supported)");
    let out = conv_out_shape(xs, ws[0], k, stride, padding);
    let geom = GatherGeom {
        k,
        s: stride,
        os: 1,
        ncls: 1,
        off: [[-(padding as i64); 3]; 2],
        cin: xs[1],
        cout: ws[0],
    };
    let prep = Prep {
        w,
        k,
        kk: k,
        out: ws[0],
        inp: ws[1],
        so: ws[1] * k * k * k,
        si: k * k * k,
        tstep: 1,
        tbase: [[0; 3]; 2],
        ncls: 1,
    };
    let y = gather(x, &prep, None, Some(b), out, &geom);
    Tensor::with_op(
        y,
        Op::Conv3d { x: Saved::new(x), w: w.clone(), b: b.clone(), stride, padding, bias_cancels },
    )
}

/// x `[N, Cin, X, Y, Z]`, w `[Cin, Cout, 2, 2, 2]` (PyTorch's ConvTranspose3d layout), b `[Cout]` ->
/// `[N, Cout, 2X, 2Y, 2Z]`: kernel 2, stride 2.
pub fn conv_transpose3d(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    conv_transpose3d_op(x, w, b, false)
}

/// [`conv_transpose3d`] whose output feeds a BatchNorm in training mode (see
/// [`conv3d_before_batchnorm`]).
pub fn conv_transpose3d_before_batchnorm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    conv_transpose3d_op(x, w, b, true)
}

fn conv_transpose3d_op(x: &Tensor, w: &Tensor, b: &Tensor, bias_cancels: bool) -> Tensor {
    let (xs, ws) = (dims5(x, "conv_transpose3d input"), dims5(w, "conv_transpose3d weight"));
    assert_eq!(&ws[2..], &[2, 2, 2], "conv_transpose3d weight {ws:?}: kernel 2 only");
    assert_eq!(xs[1], ws[0], "conv_transpose3d: input {xs:?} and weight {ws:?} disagree on channels");
    assert_eq!(b.shape(), &[ws[1]], "conv_transpose3d: bias {:?} for {} channels", b.shape(), ws[1]);
    let (cin, cout) = (ws[0], ws[1]);
    let out = [xs[0], cout, 2 * xs[2], 2 * xs[3], 2 * xs[4]];
    // Output parity r reads input q with tap r: eight 1x1 convolutions.
    let geom = GatherGeom { k: 1, s: 1, os: 2, ncls: 8, off: [[0; 3]; 2], cin, cout };
    let prep = Prep {
        w,
        k: 2,
        kk: 1,
        out: cout,
        inp: cin,
        so: 8,
        si: cout * 8,
        tstep: 0,
        tbase: [[0; 3], [1; 3]],
        ncls: 8,
    };
    let up = Prep {
        w,
        k: 2,
        kk: 2,
        out: cout,
        inp: cin,
        so: 8,
        si: cout * 8,
        tstep: 1,
        tbase: [[0; 3]; 2],
        ncls: 1,
    };
    let y = gather(x, &prep, Some(&up), Some(b), out, &geom);
    Tensor::with_op(y, Op::ConvTranspose3d { x: Saved::new(x), w: w.clone(), b: b.clone(), bias_cancels })
}

impl Tensor {
    pub fn conv3d(&self, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Tensor {
        conv3d(self, w, b, stride, padding)
    }
    pub fn conv_transpose3d(&self, w: &Tensor, b: &Tensor) -> Tensor {
        conv_transpose3d(self, w, b)
    }
}

/// Gradient of conv3d's input: dy [N, Cout, X', Y', Z'], w [Cout, Cin, k, k, k] -> dx of shape
/// `x_shape`.
pub fn conv3d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    stride: usize,
    padding: usize,
) -> Tensor {
    let ws = dims5(w, "conv3d weight");
    let xs: [usize; 5] = x_shape.try_into().expect("conv3d input shape of rank 5");
    let (cout, cin, k) = (ws[0], ws[1], ws[2]);
    let (s, p) = (stride as i64, padding as i64);
    // Input position s*q + r receives the taps t = t0 + s*j of output q + c - j, t0 = (r + p) mod s,
    // c = (r + p - t0) / s: a stride-1 gather with the kernel flipped and subsampled.
    let classes: Vec<(i64, i64, i64)> = (0..s)
        .map(|r| {
            let t0 = (r + p) % s;
            let n = if (k as i64) > t0 { (k as i64 - t0 + s - 1) / s } else { 0 };
            (t0, n, (r + p - t0) / s)
        })
        .collect();
    let kk = classes.iter().map(|c| c.1).max().unwrap().max(1);
    let mut tbase = [[0; 3]; 2];
    let mut off = [[0; 3]; 2];
    for (r, &(t0, _, c)) in classes.iter().enumerate() {
        tbase[r] = [t0 + s * (kk - 1); 3];
        off[r] = [c - (kk - 1); 3];
    }
    let ncls = if stride == 2 { 8 } else { 1 };
    let geom = GatherGeom { k: kk as usize, s: 1, os: stride, ncls, off, cin: cout, cout: cin };
    let prep = Prep {
        w,
        k,
        kk: kk as usize,
        out: cin,
        inp: cout,
        so: k * k * k,
        si: cin * k * k * k,
        tstep: -s,
        tbase,
        ncls,
    };
    // A k2 s2 p0 convolution's input gradient is a k2 s2 transposed convolution of dy.
    let up = (k == 2 && stride == 2 && padding == 0).then_some(Prep {
        w,
        k: 2,
        kk: 2,
        out: cin,
        inp: cout,
        so: 8,
        si: cin * 8,
        tstep: 1,
        tbase: [[0; 3]; 2],
        ncls: 1,
    });
    gather(dy, &prep, up.as_ref(), None, xs, &geom)
}

/// Gradient of conv3d's weight: dy [N, Cout, X', Y', Z'], x [N, Cin, X, Y, Z] -> [Cout, Cin, k, k, k].
pub fn conv3d_weight_grad(dy: &Tensor, x: &Tensor, k: usize, stride: usize, padding: usize) -> Tensor {
    let geom = WgradGeom { k, s: stride, off: [-(padding as i64); 3] };
    wgrad(dy, x, &geom)
}

/// Gradient of conv_transpose3d's input: dy [N, Cout, 2X, 2Y, 2Z], w [Cin, Cout, 2, 2, 2] ->
/// [N, Cin, X, Y, Z]: a k2 s2 convolution of dy.
pub fn conv_transpose3d_input_grad(dy: &Tensor, w: &Tensor, x_shape: &[usize]) -> Tensor {
    let ws = dims5(w, "conv_transpose3d weight");
    let xs: [usize; 5] = x_shape.try_into().expect("conv_transpose3d input shape of rank 5");
    let (cin, cout) = (ws[0], ws[1]);
    let geom = GatherGeom { k: 2, s: 2, os: 1, ncls: 1, off: [[0; 3]; 2], cin: cout, cout: cin };
    let prep = Prep {
        w,
        k: 2,
        kk: 2,
        out: cin,
        inp: cout,
        so: cout * 8,
        si: 8,
        tstep: 1,
        tbase: [[0; 3]; 2],
        ncls: 1,
    };
    gather(dy, &prep, None, None, xs, &geom)
}

/// Gradient of conv_transpose3d's weight: dy [N, Cout, 2X, 2Y, 2Z], x [N, Cin, X, Y, Z] ->
/// [Cin, Cout, 2, 2, 2].
pub fn conv_transpose3d_weight_grad(dy: &Tensor, x: &Tensor) -> Tensor {
    wgrad(x, dy, &WgradGeom { k: 2, s: 2, off: [0; 3] })
}

/// Backward rule of conv3d: gradients of (x, w, b) given dy.
pub(crate) fn conv3d_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
    bias_cancels: bool,
) -> Vec<Option<Tensor>> {
    vec![
        x.tracks_grad().then(|| conv3d_input_grad(dy, w, x.shape(), stride, padding)),
        w.tracks_grad().then(|| conv3d_weight_grad(dy, x, w.dim(2), stride, padding)),
        b.tracks_grad().then(|| bias_grad(dy, bias_cancels)),
    ]
}

/// The bias gradient: the output gradient summed over all but the channel axis, or zero.
fn bias_grad(dy: &Tensor, bias_cancels: bool) -> Tensor {
    if bias_cancels { Tensor::zeros(&[dy.dim(1)]) } else { dy.sum(&[0, 2, 3, 4], false) }
}

/// Backward rule of conv_transpose3d: gradients of (x, w, b) given dy.
pub(crate) fn conv_transpose3d_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    bias_cancels: bool,
) -> Vec<Option<Tensor>> {
    vec![
        x.tracks_grad().then(|| conv_transpose3d_input_grad(dy, w, x.shape())),
        w.tracks_grad().then(|| conv_transpose3d_weight_grad(dy, x)),
        b.tracks_grad().then(|| bias_grad(dy, bias_cancels)),
    ]
}

/// Output shape of conv3d.
pub fn conv_out_shape(xs: [usize; 5], cout: usize, k: usize, stride: usize, padding: usize) -> [usize; 5] {
    let o = |d: usize| {
        assert!(d + 2 * padding >= k, "conv3d: extent {d} with padding {padding} is smaller than kernel {k}");
        (d + 2 * padding - k) / stride + 1
    };
    [xs[0], cout, o(xs[2]), o(xs[3]), o(xs[4])]
}

fn dims5(t: &Tensor, what: &str) -> [usize; 5] {
    t.shape().try_into().unwrap_or_else(|_| panic!("{what} of shape {:?}: rank 5 expected", t.shape()))
}

// ---- kernel choice -------------------------------------------------------------------------

/// A kernel family and its tile sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algo {
    /// Register tiles of 8 subgroup lanes. Gather and up: lanes are 8 consecutive z, each
    /// holding `m` output channels x `v` rows along y (`r` = 1). Wgrad: lanes are 8 A channels
    /// (`m` per lane), a tile covers `v` B channels with every tap and steps over `r` output
    /// rows along y at a time. `z` > 1: rows along z are read or written as vectors of `z`, where
    /// the tensors' rows are whole vectors (`vec_aligned`; elsewhere the launch runs the `z` = 1
    /// tile): the k2 s2 convolution without padding (`down_sg`) reads each lane's input rows as
    /// one vector of `z` for `z` / 2 outputs, the k2 s2 transposed convolution (`upv_sg`) writes
    /// each lane's output rows as one vector of `z` from `z` / 2 inputs, wgrad reads B rows as
    /// vec2 and A rows at any alignment as vec4s (`z` = 2) or A and B rows as vec4, 16 z a step
    /// (`z` = 4). `lz` (wgrad with `z` = 4):
    /// lanes split into `lz` groups along the step's z, 8 / `lz` lanes over A channels; each
    /// lane then receives by shuffle only its group's B values.
    ///
    /// Stride-1 convolutions padded by (k - 1) / 2 along z, k = 3 (and 1 for the gather): with
    /// `z` > 1 the gather runs `conv_sgv`, each lane holding a vector of `z` outputs along z of
    /// `m` channels x `v` rows, and wgrad with `lz` = 8 runs `wgrad_sgv`, every lane summing `m`
    /// A channels x `v` B channels x every tap over its own vectors of `z` of `r` rows. Both put
    /// as many lanes along a row as cover it (at most 8) and the rest of the tile on other rows.
    Subgroup { m: u32, v: u32, r: u32, z: u32, lz: u32 },
    /// Workgroup-memory implicit GEMM: `bm` (channels) x `bn` (voxels, or B columns) per
    /// workgroup, reduced `bk` at a time, `tm` x `tn` per invocation.
    Tiled { bm: u32, bn: u32, bk: u32, tm: u32, tn: u32 },
}

/// The workgroup-memory GEMM pipeline of `shader`/`entry` for kernel size `k`, stride `s` and a
/// tiled `algo`'s tile sizes (as override constants).
fn tiled_kernel(shader: &'static str, entry: &'static str, k: usize, s: usize, algo: Algo) -> Kernel {
    let Algo::Tiled { bm, bn, bk, tm, tn } = algo else { panic!("{algo} is not a tiled algorithm") };
    Kernel::new(shader, entry)
        .with("KS", k as f64)
        .with("ST", s as f64)
        .with("BM", bm as f64)
        .with("BN", bn as f64)
        .with("BK", bk as f64)
        .with("TM", tm as f64)
        .with("TN", tn as f64)
        .with("WGS", ((bn / tn) * (bm / tm)) as f64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// The gather form in general.
    Gather,
    /// The gather form of a k2 s2 transposed convolution (conv_transpose3d's forward, the input
    /// gradient of a k2 s2 conv3d): its subgroup kernels compute all eight output parities of
    /// an input voxel together.
    Up,
    Wgrad,
}

const SUBGROUP_GATHER: &[(u32, u32, u32, u32, u32)] = &[
    (8, 4, 1, 1, 1),
    (16, 4, 1, 1, 1),
    (8, 8, 1, 1, 1),
    (4, 8, 1, 1, 1),
    (4, 4, 1, 4, 1),
    (8, 4, 1, 4, 1),
    (8, 8, 1, 2, 1),
    (8, 4, 1, 2, 1),
    // One row per lane: short rows along z put up to 8 rows along y in a tile.
    (8, 1, 1, 4, 1),
    (16, 1, 1, 4, 1),
    (16, 1, 1, 2, 1),
];
/// Kernels of at most 2^3 taps reuse an input only across channels: wider channel tiles.
const SUBGROUP_GATHER_SMALL: &[(u32, u32, u32, u32, u32)] = &[
    (8, 4, 1, 1, 1),
    (16, 4, 1, 1, 1),
    (32, 4, 1, 1, 1),
    (4, 8, 1, 1, 1),
    (16, 2, 1, 4, 1),
    (32, 1, 1, 4, 1),
    (8, 2, 1, 4, 1),
    (16, 2, 1, 2, 1),
    (32, 2, 1, 2, 1),
    (4, 4, 1, 4, 1),
];
const SUBGROUP_UP: &[(u32, u32, u32, u32, u32)] = &[
    (4, 4, 1, 1, 1),
    (8, 2, 1, 1, 1),
    (2, 4, 1, 1, 1),
    (8, 4, 1, 1, 1),
    (4, 2, 1, 4, 1),
    (8, 1, 1, 4, 1),
    (4, 4, 1, 2, 1),
    (8, 2, 1, 2, 1),
];
const SUBGROUP_WGRAD: &[(u32, u32, u32, u32, u32)] = &[
    (2, 2, 1, 1, 1),
    (4, 1, 1, 1, 1),
    (2, 1, 2, 1, 1),
    (1, 2, 2, 1, 1),
    (4, 4, 1, 4, 8),
    (2, 4, 1, 4, 8),
    (4, 4, 1, 2, 8),
    (2, 2, 1, 4, 8),
    (4, 4, 2, 4, 8),
    (4, 4, 3, 4, 8),
    (4, 4, 2, 2, 8),
];
/// Kernels of at most 2^3 taps hold more B channels per tile for the same registers.
const SUBGROUP_WGRAD_SMALL: &[(u32, u32, u32, u32, u32)] = &[
    (2, 2, 1, 1, 1),
    (4, 2, 1, 1, 1),
    (4, 4, 1, 1, 1),
    (1, 4, 1, 1, 1),
    (2, 2, 1, 4, 1),
    (2, 4, 1, 4, 1),
    (4, 2, 1, 4, 1),
    (1, 4, 1, 4, 1),
    (2, 2, 1, 2, 1),
    (4, 2, 1, 2, 1),
    (4, 4, 1, 2, 1),
    (4, 2, 1, 4, 2),
    (4, 4, 1, 4, 2),
    (8, 2, 1, 4, 2),
];
const TILED: [Algo; 2] = [
    Algo::Tiled { bm: 32, bn: 64, bk: 16, tm: 4, tn: 4 },
    Algo::Tiled { bm: 64, bn: 64, bk: 8, tm: 4, tn: 4 },
];

/// The algorithm a launch runs: a subgroup tile with vectors along z that the shape's rows do
/// not fit (`aligned`) runs as the same tile with scalars.
fn effective(algo: Algo, aligned: impl Fn(u32) -> bool) -> Algo {
    match algo {
        Algo::Subgroup { m, v, r, z, .. } if !aligned(z) => Algo::Subgroup { m, v, r, z: 1, lz: 1 },
        a => a,
    }
}

/// True when rows of `len` elements along z, in every tensor (sample) bound with `bases`
/// (element offsets of a binding's first value), are whole vectors of `z`.
fn vec_aligned(z: u32, len: &[usize], bases: &[usize]) -> bool {
    let z = z as usize;
    z == 1 || len.iter().chain(bases).all(|&e| e % z == 0)
}

/// Lanes of a vector tile along a row of `len` values along z, z per lane: as many as cover the
/// row (a power of two), at most the 8 of a tile (which then steps along longer rows).
fn lanes_along(len: usize, z: usize) -> usize {
    len.div_ceil(z).next_power_of_two().min(8)
}

/// True when the adapter runs the subgroup kernels: shuffles within groups of 8 lanes.
pub fn subgroups_usable() -> bool {
    let g = gpu();
    g.features.contains(wgpu::Features::SUBGROUP) && g.info.subgroup_min_size >= 8
}

/// Every algorithm this adapter can run for a form and kernel size (what the tests check).
pub fn algos(form: Form, k: usize) -> Vec<Algo> {
    let mut v: Vec<Algo> = Vec::new();
    if subgroups_usable() {
        let sg = match form {
            Form::Gather if k <= 2 => SUBGROUP_GATHER_SMALL,
            Form::Gather => SUBGROUP_GATHER,
            Form::Up => SUBGROUP_UP,
            Form::Wgrad if k <= 2 => SUBGROUP_WGRAD_SMALL,
            Form::Wgrad => SUBGROUP_WGRAD,
        };
        v.extend(sg.iter().map(|&(m, v, r, z, lz)| Algo::Subgroup { m, v, r, z, lz }));
    }
    v.extend(TILED);
    v
}

/// The candidates timed for a shape: subgroup tiles no wider than the channels they cover
/// (`channels` = output channels, or (A, B) channels of a weight gradient) whose vectors along
/// z fit the shape (`aligned`), and on a software device only those (its workgroup memory is as
/// slow as storage).
fn candidates(form: Form, k: usize, channels: (usize, usize), aligned: &dyn Fn(u32) -> bool) -> Vec<Algo> {
    let all = algos(form, k);
    let fits = |a: &Algo| match (form, a) {
        (_, Algo::Subgroup { z, .. }) if !aligned(*z) => false,
        (Form::Wgrad, Algo::Subgroup { m, v, lz, .. }) => {
            (8 / lz * m) as usize <= channels.0.next_power_of_two().max(8)
                && *v as usize <= channels.1.next_power_of_two()
        }
        (_, Algo::Subgroup { m, .. }) => *m as usize <= channels.0.next_power_of_two().max(4),
        _ => true,
    };
    let software_sg = gpu().is_software() && subgroups_usable();
    let c: Vec<Algo> = all
        .iter()
        .copied()
        .filter(fits)
        .filter(|a| !(software_sg && matches!(a, Algo::Tiled { .. })))
        .collect();
    if c.is_empty() { all } else { c }
}

thread_local! {
    static FORCED: Cell<[Option<Algo>; 3]> = const { Cell::new([None; 3]) };
}

pub use crate::ops::with_binding_limit;

fn binding_limit() -> u64 {
    crate::ops::binding_limit()
}

/// Runs `f` with `algo` used for every launch of `form` on this thread (tests, benchmarks).
pub fn with_algo<R>(form: Form, algo: Algo, f: impl FnOnce() -> R) -> R {
    let mut forced = FORCED.with(Cell::get);
    forced[form as usize] = Some(algo);
    crate::autograd::with_flag(&FORCED, forced, f)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TuneKey {
    form: Form,
    k: usize,
    s: usize,
    ncls: usize,
    channels: (usize, usize),
    /// log2 of the output voxels of one launch
    vox: u32,
    /// The widest vectors along z that the shape's rows fit (1, 2 or 4)
    zvec: u32,
}

/// The widest vector width along z that `aligned` accepts.
fn widest(aligned: &dyn Fn(u32) -> bool) -> u32 {
    [4, 2].into_iter().find(|&z| aligned(z)).unwrap_or(1)
}

static TUNED: Mutex<Option<HashMap<TuneKey, Algo>>> = Mutex::new(None);

thread_local! {
    static LAST: Cell<[Option<Algo>; 3]> = const { Cell::new([None; 3]) };
}

/// The algorithm of this thread's latest launch of a form (benchmark reports).
pub fn last_algo(form: Form) -> Option<Algo> {
    LAST.with(|c| c.get()[form as usize])
}

/// The algorithms chosen so far, for reports.
pub fn tuned() -> Vec<(String, Algo)> {
    let t = TUNED.lock().unwrap();
    t.iter().flatten().map(|(k, a)| (format!("{k:?}"), *a)).collect()
}

/// Choices of earlier processes, read from the file named by `CAML_CONV_TUNE_FILE` (lines of
/// "adapter|bucket<TAB>algorithm"); new choices are appended to it.
static PERSISTED: Mutex<Option<HashMap<String, Algo>>> = Mutex::new(None);

/// `CAML_CONV_TUNE_FILE` (empty: none), else `conv_tune.tsv` in the pipeline cache folder.
fn tune_file() -> Option<std::path::PathBuf> {
    match std::env::var_os("CAML_CONV_TUNE_FILE") {
        Some(p) => (!p.is_empty()).then(|| p.into()),
        None => crate::gpu::pipeline_cache::cache_dir().map(|d| d.join("conv_tune.tsv")),
    }
}

fn key_text(key: &TuneKey) -> String {
    let (c0, c1) = key.channels;
    let z = if key.zvec > 1 { format!(" z{}", key.zvec) } else { String::new() };
    format!(
        "{}|{:?} k{} s{} c{} {c0}x{c1} v{}{z}",
        gpu().info.name,
        key.form,
        key.k,
        key.s,
        key.ncls,
        key.vox
    )
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Algo::Subgroup { m, v, r, z: 1, lz: 1 } => write!(f, "subgroup {m} {v} {r}"),
            Algo::Subgroup { m, v, r, z, lz: 1 } => write!(f, "subgroup {m} {v} {r} {z}"),
            Algo::Subgroup { m, v, r, z, lz } => write!(f, "subgroup {m} {v} {r} {z} {lz}"),
            Algo::Tiled { bm, bn, bk, tm, tn } => write!(f, "tiled {bm} {bn} {bk} {tm} {tn}"),
        }
    }
}

impl std::str::FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.split_whitespace();
        let kind = it.next().unwrap_or("");
        let n: Vec<u32> =
            it.map(|t| t.parse().map_err(|_| format!("bad number in '{s}'"))).collect::<Result<_, _>>()?;
        match (kind, n.as_slice()) {
            ("subgroup", &[m, v, r]) => Ok(Algo::Subgroup { m, v, r, z: 1, lz: 1 }),
            ("subgroup", &[m, v, r, z]) => Ok(Algo::Subgroup { m, v, r, z, lz: 1 }),
            ("subgroup", &[m, v, r, z, lz]) => Ok(Algo::Subgroup { m, v, r, z, lz }),
            ("tiled", &[bm, bn, bk, tm, tn]) => Ok(Algo::Tiled { bm, bn, bk, tm, tn }),
            _ => Err(format!("not an algorithm: '{s}'")),
        }
    }
}

fn persisted(key: &TuneKey) -> Option<Algo> {
    let path = tune_file()?;
    let mut p = PERSISTED.lock().unwrap();
    let map = p.get_or_insert_with(|| {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once('\t'))
            .filter_map(|(k, a)| Some((k.to_string(), a.parse().ok()?)))
            .collect()
    });
    map.get(&key_text(key)).copied()
}

fn persist(key: &TuneKey, algo: Algo) {
    let Some(path) = tune_file() else { return };
    use std::io::Write as _;
    let line = format!("{}\t{algo}\n", key_text(key));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("warning: could not record a convolution kernel choice in {}: {e}", path.display());
    }
}

/// Runs `run` with the forced, cached or fastest algorithm and returns its result. The first
/// launch of a shape bucket runs every candidate once (compiling it) and then times it, each
/// run waited for by a readback, taking the best of up to three runs within 0.1 s; the chosen
/// candidate's result is returned (the candidates' results differ in rounding).
fn autotune(key: TuneKey, cands: Vec<Algo>, run: &dyn Fn(Algo) -> Tensor) -> Tensor {
    let form = key.form as usize;
    let go = |a: Algo| {
        LAST.with(|c| {
            let mut v = c.get();
            v[form] = Some(a);
            c.set(v);
        });
        run(a)
    };
    if let Some(a) = FORCED.with(|c| c.get()[form]) {
        return go(a);
    }
    if let Some(&a) = TUNED.lock().unwrap().get_or_insert_with(HashMap::new).get(&key) {
        return go(a);
    }
    if let Some(a) = persisted(&key).filter(|a| cands.contains(a)) {
        TUNED.lock().unwrap().get_or_insert_with(HashMap::new).insert(key, a);
        return go(a);
    }
    if cands.len() == 1 || std::env::var_os("CAML_CONV_NO_TUNE").is_some() {
        TUNED.lock().unwrap().get_or_insert_with(HashMap::new).insert(key, cands[0]);
        return go(cands[0]);
    }
    let wait = |t: &Tensor| {
        gpu().read(t.buffer(), 0, 4);
    };
    // Timed for real also while a step is rehearsed (on the rehearsal's stale inputs).
    let best = gpu().for_real(|| {
        let mut best: Option<(f64, Algo, Tensor)> = None;
        for &a in &cands {
            wait(&go(a));
            let (mut fastest, mut spent, mut last) = (f64::MAX, 0.0, None);
            for _ in 0..3 {
                let t0 = Instant::now();
                let out = go(a);
                wait(&out);
                let dt = t0.elapsed().as_secs_f64();
                (fastest, spent, last) = (fastest.min(dt), spent + dt, Some(out));
                if spent > 0.1 {
                    break;
                }
            }
            if best.as_ref().is_none_or(|(b, ..)| fastest < *b) {
                best = Some((fastest, a, last.expect("a timed run")));
            }
        }
        best
    });
    let (_, chosen, out) = best.expect("at least one candidate");
    TUNED.lock().unwrap().get_or_insert_with(HashMap::new).insert(key.clone(), chosen);
    persist(&key, chosen);
    // The chosen kernel's own result (kernels sum in different orders): the same values as every
    // later launch of the shape.
    LAST.with(|c| {
        let mut v = c.get();
        v[form] = Some(chosen);
        c.set(v);
    });
    out
}

// ---- bindings ------------------------------------------------------------------------------

/// A tensor bound whole (`sample` None) or one sample of it, from the aligned offset below it.
/// `base` is the element offset of its first element within the binding.
fn bind_sample(t: &Tensor, sample: Option<usize>) -> (Binding<'_>, usize) {
    let Some(n) = sample else { return (t.binding(), 0) };
    let per = t.numel() / t.dim(0) * 4;
    let offset = (n * per) as u64;
    let align = gpu().limits.min_storage_buffer_offset_alignment as u64;
    let start = offset - offset % align;
    let size = offset + per as u64 - start;
    let limit = binding_limit();
    assert!(
        size <= limit,
        "one sample of a tensor of shape {:?} is {per} bytes, over this adapter's storage binding \
         limit of {limit} bytes",
        t.shape()
    );
    (Binding { buffer: t.buffer(), offset: start, size: Some(size) }, ((offset - start) / 4) as usize)
}

/// True when some tensor must be bound one sample per launch.
fn split_batch(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.bytes() > binding_limit())
}

// ---- gather form ---------------------------------------------------------------------------

/// dst[n, o, q*os + r] = bias[o] + sum_i sum_d src[n, i, q*s + d + off[r]] * W_r[o, i, d], d over
/// k^3 (per axis, r = the parity of that axis).
struct GatherGeom {
    k: usize,
    s: usize,
    os: usize,
    ncls: usize,
    off: [[i64; 3]; 2],
    cin: usize,
    cout: usize,
}

/// How W_r[o, i, d] is read from a weight tensor: w[o * so + i * si + tap], tap per axis =
/// tbase[r] + tstep * d within a k^3 kernel (else 0); `kk` is the gather's kernel size.
struct Prep<'a> {
    w: &'a Tensor,
    k: usize,
    kk: usize,
    out: usize,
    inp: usize,
    so: usize,
    si: usize,
    tstep: i64,
    tbase: [[i64; 3]; 2],
    ncls: usize,
}

impl Prep<'_> {
    /// The weights in blocks of `m` output channels (conv3d.wgsl), with 8 spare entries so that
    /// a tile may read a whole last row of 8.
    fn run(&self, m: usize) -> Tensor {
        let cblocks = self.out.div_ceil(m);
        let total = self.ncls * cblocks * self.inp * self.kk.pow(3) * m;
        let out = Tensor::empty(&[total + 8]);
        // The block width and the prepared kernel's size go as the shader's constants PM, PKK.
        let mut p = Params::new()
            .u(self.k)
            .u(self.out)
            .u(self.inp)
            .u(self.ncls)
            .u(cblocks)
            .u(total)
            .u(self.so)
            .u(self.si)
            .i(self.tstep)
            .u(0)
            .u(0)
            .u(0);
        for r in self.tbase {
            p = p.i(r[0]).i(r[1]).i(r[2]).i(0);
        }
        gpu().dispatch_1d(
            &Kernel::new("conv3d", "prep_weights").with("PM", m as f64).with("PKK", self.kk as f64),
            p.bytes(),
            &[self.w.binding(), out.binding()],
            (total / m) as u64,
        );
        out
    }
}

/// Runs the gather form. `up`, for a k2 s2 transposed convolution (k 1, os 2, eight classes,
/// no offsets), is the same weights as one 2x2x2 kernel per output channel block, read by the
/// subgroup kernels that compute all eight parities of an input voxel together.
fn gather(
    src: &Tensor,
    prep: &Prep,
    up: Option<&Prep>,
    bias: Option<&Tensor>,
    out_shape: [usize; 5],
    g: &GatherGeom,
) -> Tensor {
    let ss = dims5(src, "convolution input");
    assert_eq!(ss[1], g.cin, "convolution input {ss:?}: {} channels expected", g.cin);
    assert_eq!(ss[0], out_shape[0], "convolution batch");
    let form = if up.is_some() { Form::Up } else { Form::Gather };
    let ext: Vec<usize> = out_shape[2..].iter().map(|&d| d.div_ceil(g.os)).collect();
    let vox = (ext.iter().product::<usize>() * g.ncls).max(1);
    // Vectors along z: the k2 s2 convolution without padding (`down_sg`) reads input rows as
    // vectors of z and writes z / 2 outputs per lane.
    let samples = [src.numel() / ss[0], out_shape[1..].iter().product(), crate::ops::align_elems()];
    let down = form == Form::Gather
        && (g.k, g.s, g.os, g.ncls, g.off) == (2, 2, 1, 1, [[0; 3]; 2])
        && (prep.k, prep.so, prep.si, prep.tstep, prep.tbase) == (2, 8 * prep.inp, 8, 1, [[0; 3]; 2]);
    // The stride-1 convolution padded by (k - 1) / 2 along z (`conv_sgv`) reads and writes rows
    // along z as vectors, z outputs per lane.
    let same = form == Form::Gather
        && (g.s, g.os, g.ncls) == (1, 1, 1)
        && g.k % 2 == 1
        && g.off[0][2] == -((g.k as i64 - 1) / 2)
        && ss[4] == out_shape[4];
    // And the k2 s2 transposed convolution (`upv_sg`) reads z / 2 inputs per lane as a vector
    // and writes output rows as vectors of z.
    let upv =
        up.is_some_and(|u| (u.k, u.kk, u.so, u.si, u.tstep, u.tbase) == (2, 2, 8, 8 * u.out, 1, [[0; 3]; 2]));
    let aligned = |z: u32| {
        let (src_rows, dst_rows) = ([ss[4]], [out_shape[4]]);
        let (src_samples, dst_samples) = ([samples[0], samples[2]], [samples[1], samples[2]]);
        z == 1
            || (down && ss[4] == 2 * out_shape[4] && vec_aligned(z, &[ss[4], 2 * out_shape[4]], &samples))
            || (same && (g.k - 1) / 2 <= z as usize && vec_aligned(z, &[ss[4]], &samples))
            || (upv
                && out_shape[4] == 2 * ss[4]
                && vec_aligned(z / 2, &src_rows, &src_samples)
                && vec_aligned(z, &dst_rows, &dst_samples))
    };
    let key = TuneKey {
        form,
        k: g.k,
        s: g.s,
        ncls: g.ncls,
        channels: (g.cin, g.cout),
        vox: usize::BITS - (vox * if split_batch(&[src]) { 1 } else { ss[0] }).leading_zeros(),
        zvec: widest(&aligned),
    };
    let run = |algo: Algo| {
        let algo = effective(algo, aligned);
        let dst = Tensor::empty(&out_shape);
        if dst.numel() == 0 {
            return dst;
        }
        let (m, prep) = match (algo, up) {
            (Algo::Subgroup { m, .. }, Some(up)) => (m, up),
            (Algo::Subgroup { m, .. }, None) => (m, prep),
            (Algo::Tiled { bm, .. }, _) => (bm, prep),
        };
        // `down_sg` and `upv_sg` read the weights in place.
        let wt = match algo {
            Algo::Subgroup { z: 2 | 4, .. } if !same => prep.w.clone(),
            _ => prep.run(m as usize),
        };
        let samples: Vec<Option<usize>> =
            if split_batch(&[src, &dst]) { (0..ss[0]).map(Some).collect() } else { vec![None] };
        for n in samples {
            match (algo, up) {
                (Algo::Subgroup { .. }, Some(_)) => launch_up(algo, src, n, &wt, bias, &dst, &ext, g),
                _ => launch_gather(algo, same, src, n, &wt, bias, &dst, &ext, g),
            }
        }
        dst
    };
    autotune(key, candidates(form, g.k, (g.cout, g.cin), &aligned), &run)
}

/// `same`: a vector tile runs `conv_sgv` (else `down_sg`).
#[allow(clippy::too_many_arguments)]
fn launch_gather(
    algo: Algo,
    same: bool,
    src: &Tensor,
    sample: Option<usize>,
    wt: &Tensor,
    bias: Option<&Tensor>,
    dst: &Tensor,
    ext: &[usize],
    g: &GatherGeom,
) {
    let (ss, ds) = (src.shape(), dst.shape());
    let nbatch = if sample.is_some() { 1 } else { ss[0] };
    let (sb, src_base) = bind_sample(src, sample);
    let (db, dst_base) = bind_sample(dst, sample);
    let m = match algo {
        Algo::Subgroup { m, .. } => m,
        Algo::Tiled { bm, .. } => bm,
    } as usize;
    let cblocks = g.cout.div_ceil(m);
    let (zblocks, yblocks, tiles) = match algo {
        Algo::Subgroup { v, z: z @ (2 | 4), .. } if same => {
            // `conv_sgv`: lanes hold z outputs along z, `lanes` of them along a row.
            let (z, v) = (z as usize, v as usize);
            let lanes = lanes_along(ext[2], z);
            let (zb, yb) = (ext[2].div_ceil(lanes * z), ext[1].div_ceil(v * 8 / lanes));
            (zb, yb, zb * yb * ext[0] * cblocks * nbatch)
        }
        Algo::Subgroup { v, z, .. } => {
            // Each lane of `down_sg` holds z / 2 outputs along z.
            let zq = (z as usize / 2).max(1);
            let (zb, yb) = (ext[2].div_ceil(8 * zq), ext[1].div_ceil(v as usize));
            (zb, yb, zb * yb * ext[0] * cblocks * g.ncls * nbatch)
        }
        Algo::Tiled { bn, .. } => (0, 0, (ext[0] * ext[1] * ext[2]).div_ceil(bn as usize)),
    };
    let mut p = Params::new()
        .u(g.cin)
        .u(g.cout)
        .u(ss[2])
        .u(ss[3])
        .u(ss[4])
        .u(ds[2])
        .u(ds[3])
        .u(ds[4])
        .u(g.os)
        .u(g.ncls)
        .u(zblocks)
        .u(yblocks)
        .u(ext[0])
        .u(cblocks)
        .u(tiles)
        .u(bias.is_some() as usize)
        .u(src_base)
        .u(ss[1..].iter().product())
        .u(dst_base)
        .u(ds[1..].iter().product())
        .u(cblocks * g.cin * g.k.pow(3) * m)
        .u(nbatch)
        .u(0)
        .u(0);
    for r in g.off {
        p = p.i(r[0]).i(r[1]).i(r[2]).i(0);
    }
    let bias_binding = bias.map_or(wt.binding(), |b| b.binding());
    let bindings = [sb, wt.binding(), bias_binding, db];
    match algo {
        Algo::Subgroup { m, v, z: z @ (2 | 4), .. } if same => {
            // A tile spanning its rows along z needs no halo beyond them.
            let lanes = lanes_along(ext[2], z as usize);
            let shader = sg_gather_vec_shader(g.k, m as usize, v as usize, z as usize, lanes, zblocks == 1);
            gpu().dispatch(
                &Kernel::new(shader, "conv_sgv"),
                p.bytes(),
                &bindings,
                gpu().groups_1d(tiles as u64, 8),
            );
        }
        Algo::Subgroup { m, v, z: z @ (2 | 4), .. } => {
            let kernel = Kernel::new(sg_down_shader(m as usize, v as usize, z as usize), "down_sg");
            gpu().dispatch(&kernel, p.bytes(), &bindings, gpu().groups_1d(tiles as u64, 8));
        }
        Algo::Subgroup { m, v, .. } => {
            let kernel = Kernel::new(sg_gather_shader(g.k, g.s, m as usize, v as usize), "conv_sg");
            gpu().dispatch(&kernel, p.bytes(), &bindings, gpu().groups_1d(tiles as u64, 8));
        }
        Algo::Tiled { .. } => {
            let kernel = tiled_kernel("conv3d", "conv_tiled", g.k, g.s, algo);
            let [gx, gy, _] = gpu().groups_1d(tiles as u64, 1);
            gpu().dispatch(&kernel, p.bytes(), &bindings, [gx, gy, (cblocks * g.ncls * nbatch) as u32]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_up(
    algo: Algo,
    src: &Tensor,
    sample: Option<usize>,
    wt: &Tensor,
    bias: Option<&Tensor>,
    dst: &Tensor,
    ext: &[usize],
    g: &GatherGeom,
) {
    let Algo::Subgroup { m, v, z, .. } = algo else { unreachable!("the up kernels are subgroup kernels") };
    let (ss, ds) = (src.shape(), dst.shape());
    let nbatch = if sample.is_some() { 1 } else { ss[0] };
    let (sb, src_base) = bind_sample(src, sample);
    let (db, dst_base) = bind_sample(dst, sample);
    let cblocks = g.cout.div_ceil(m as usize);
    // Lanes of `upv_sg` hold z / 2 inputs along z.
    let zq = (z as usize / 2).max(1);
    let (zblocks, yblocks) = (ext[2].div_ceil(8 * zq), ext[1].div_ceil(v as usize));
    let tiles = zblocks * yblocks * ext[0] * cblocks * nbatch;
    let mut p = Params::new()
        .u(g.cin)
        .u(g.cout)
        .u(ss[2])
        .u(ss[3])
        .u(ss[4])
        .u(ds[2])
        .u(ds[3])
        .u(ds[4])
        .u(2)
        .u(1)
        .u(zblocks)
        .u(yblocks)
        .u(ext[0])
        .u(cblocks)
        .u(tiles)
        .u(bias.is_some() as usize)
        .u(src_base)
        .u(ss[1..].iter().product())
        .u(dst_base)
        .u(ds[1..].iter().product())
        .u(0)
        .u(nbatch)
        .u(0)
        .u(0);
    for _ in 0..8 {
        p = p.i(0);
    }
    let bias_binding = bias.map_or(wt.binding(), |b| b.binding());
    let kernel = match z {
        1 => Kernel::new(sg_up_shader(m as usize, v as usize), "up_sg"),
        _ => Kernel::new(sg_up_vec_shader(m as usize, v as usize, z as usize), "upv_sg"),
    };
    gpu().dispatch(
        &kernel,
        p.bytes(),
        &[sb, wt.binding(), bias_binding, db],
        gpu().groups_1d(tiles as u64, 8),
    );
}

// ---- wgrad form ----------------------------------------------------------------------------

/// dW[a, b, t] = sum_n sum_q A[n, a, q] * B[n, b, q*s + t + off] over a k^3 kernel.
struct WgradGeom {
    k: usize,
    s: usize,
    off: [i64; 3],
}

fn wgrad(a: &Tensor, b: &Tensor, g: &WgradGeom) -> Tensor {
    let (as_, bs) = (dims5(a, "weight gradient operand"), dims5(b, "weight gradient operand"));
    assert_eq!(as_[0], bs[0], "weight gradient operands {as_:?} and {bs:?}: batch");
    let (ca, cb, k3) = (as_[1], bs[1], g.k.pow(3));
    let split = split_batch(&[a, b]);
    let vox: usize = as_[2..].iter().product::<usize>() * if split { 1 } else { as_[0] };
    // Rows of B (z = 2) or A and B (z = 4) start at multiples of z when their lengths, the z
    // offset, the samples and the bindings' offset alignment are; with z = 2 A is read as vec4s
    // at any alignment, which its bindings must hold whole.
    let align = crate::ops::align_elems();
    // Kernels over 2^3 taps read vectors only in the tile of a stride-1 convolution padded by
    // (k - 1) / 2 along z (`lz` = 8: `wgrad_sgv`), whose A and B rows are whole vectors.
    let same = g.k > 2 && g.k % 2 == 1 && g.s == 1 && g.off[2] == -((g.k as i64 - 1) / 2) && as_[4] == bs[4];
    let aligned = |z: u32| {
        if g.k > 2 {
            return z == 1
                || (same && vec_aligned(z, &[as_[4]], &[a.numel() / as_[0], b.numel() / bs[0], align]));
        }
        let b_rows = [bs[4], g.off[2].rem_euclid(z as i64) as usize];
        let a_rows = if z == 4 { as_[4] } else { 4 };
        vec_aligned(z, &b_rows, &[b.numel() / bs[0], align])
            && (z == 1 || vec_aligned(4, &[a_rows], &[a.numel() / as_[0], align]))
    };
    let key = TuneKey {
        form: Form::Wgrad,
        k: g.k,
        s: g.s,
        ncls: 1,
        channels: (ca, cb),
        vox: usize::BITS - vox.max(1).leading_zeros(),
        zvec: widest(&aligned),
    };
    let run = |algo: Algo| {
        let algo = effective(algo, aligned);
        let launches = if split { as_[0] } else { 1 };
        // Steps of the reduction: (n, qx, group of r rows along y).
        let r = match algo {
            Algo::Subgroup { r, z, lz: 8, .. } => 8 / lanes_along(as_[4], z as usize) * r as usize,
            Algo::Subgroup { r, .. } => r as usize,
            Algo::Tiled { .. } => 1,
        };
        let rows = as_[2] * as_[3].div_ceil(r) * if split { 1 } else { as_[0] };
        // Chunks of the reduction domain: enough tiles to fill the device, a bounded partial.
        let tiles = match algo {
            Algo::Subgroup { m, v, lz, .. } => ca.div_ceil((8 / lz * m) as usize) * cb.div_ceil(v as usize),
            Algo::Tiled { bm, bn, .. } => ca.div_ceil(bm as usize) * (cb * k3).div_ceil(bn as usize) * 8,
        };
        // A software device runs one workgroup (8 tiles) per thread at a time: two per thread
        // keep its threads busy, more chunks only add partial sums to add up. A GPU needs its
        // fill of invocations (8 per tile) to hide its memory latency.
        let fill = if gpu().is_software() {
            16 * std::thread::available_parallelism().map_or(4, |n| n.get())
        } else {
            gpu().fill_invocations() / 8
        };
        let want = fill.div_ceil(tiles).max(1);
        let cap = (1usize << 24) / (ca * cb * k3 * launches);
        let chunks = want.min(cap.max(1)).min(rows.max(1));
        let mut chunk_rows = rows.div_ceil(chunks).max(1);
        if gpu().is_software() {
            // Each row is one pass of the row loop and loops over z in steps of 8 (its trips plus
            // one): keep an invocation's passes within the software device's loop budget.
            let passes_per_row = as_[4].div_ceil(8) + 2;
            chunk_rows = chunk_rows.min((crate::ops::MAX_LOOP / passes_per_row).max(1));
        }
        let chunks = rows.div_ceil(chunk_rows).max(1);
        let part = Tensor::empty(&[launches * chunks, ca * cb * k3]);
        for l in 0..launches {
            let sample = split.then_some(l);
            launch_wgrad(algo, a, b, sample, &part, l * chunks, chunks, chunk_rows, rows, g);
        }
        let dw = if launches * chunks == 1 { part } else { part.sum(&[0], false) };
        dw.reshape(&[ca, cb, g.k, g.k, g.k])
    };
    autotune(key, candidates(Form::Wgrad, g.k, (ca, cb), &aligned), &run)
}

#[allow(clippy::too_many_arguments)]
fn launch_wgrad(
    algo: Algo,
    a: &Tensor,
    b: &Tensor,
    sample: Option<usize>,
    part: &Tensor,
    chunk0: usize,
    chunks: usize,
    chunk_rows: usize,
    rows: usize,
    g: &WgradGeom,
) {
    let (as_, bs) = (a.shape(), b.shape());
    let (ab, a_base) = bind_sample(a, sample);
    let (bb, b_base) = bind_sample(b, sample);
    let (ca, cb) = (as_[1], bs[1]);
    let (ablocks, bblocks, tiles) = match algo {
        Algo::Subgroup { m, v, lz, .. } => {
            let (x, y) = (ca.div_ceil((8 / lz * m) as usize), cb.div_ceil(v as usize));
            (x, y, x * y * chunks)
        }
        Algo::Tiled { .. } => (0, 0, 0),
    };
    let p = Params::new()
        .u(ca)
        .u(cb)
        .u(as_[2])
        .u(as_[3])
        .u(as_[4])
        .u(bs[2])
        .u(bs[3])
        .u(bs[4])
        .u(rows)
        .u(chunks)
        .u(chunk_rows)
        .u(ablocks)
        .u(bblocks)
        .u(tiles)
        .u(a_base)
        .u(as_[1..].iter().product())
        .u(b_base)
        .u(bs[1..].iter().product())
        .u(chunk0)
        .u(0)
        .i(g.off[0])
        .i(g.off[1])
        .i(g.off[2])
        .i(0);
    let bindings = [ab, bb, part.binding()];
    match algo {
        Algo::Subgroup { m, v, r, z, lz: 8 } => {
            // A pass spanning the rows along z needs no halo beyond them.
            let [m, v, r, z] = [m, v, r, z].map(|x| x as usize);
            let lanes = lanes_along(as_[4], z);
            let shader = sg_wgrad_vec_shader(g.k, m, v, r, z, lanes, as_[4] <= lanes * z);
            let kernel = Kernel::new(shader, "wgrad_sgv").with("KS", g.k as f64).with("ST", g.s as f64);
            gpu().dispatch(&kernel, p.bytes(), &bindings, gpu().groups_1d(tiles as u64, 8));
        }
        Algo::Subgroup { m, v, r, z, lz } => {
            let [m, v, r, z, lz] = [m, v, r, z, lz].map(|x| x as usize);
            let shader = sg_wgrad_shader(g.k, g.s, m, v, r, z, lz);
            let kernel = Kernel::new(shader, "wgrad_sg").with("KS", g.k as f64).with("ST", g.s as f64);
            gpu().dispatch(&kernel, p.bytes(), &bindings, gpu().groups_1d(tiles as u64, 8));
        }
        Algo::Tiled { bm, bn, .. } => {
            let kernel = tiled_kernel("conv3d_grad", "wgrad_tiled", g.k, g.s, algo);
            let groups = [
                (cb * g.k.pow(3)).div_ceil(bn as usize) as u32,
                ca.div_ceil(bm as usize) as u32,
                chunks as u32,
            ];
            gpu().dispatch(&kernel, p.bytes(), &bindings, groups);
        }
    }
}

// ---- CPU reference -------------------------------------------------------------------------

/// Plain loops with f64 accumulation, the reference of the tests.
pub mod cpu {
    fn idx(s: [usize; 5], n: usize, c: usize, x: usize, y: usize, z: usize) -> usize {
        (((n * s[1] + c) * s[2] + x) * s[3] + y) * s[4] + z
    }

    /// The input position read by output q through tap t, if inside.
    fn tap(q: usize, t: usize, stride: usize, pad: usize, d: usize) -> Option<usize> {
        (q * stride + t).checked_sub(pad).filter(|&i| i < d)
    }

    /// conv3d: x `[N, Cin, X, Y, Z]`, w `[Cout, Cin, k, k, k]`, b `[Cout]`.
    pub fn conv3d(
        x: &[f32],
        xs: [usize; 5],
        w: &[f32],
        ws: [usize; 5],
        b: &[f32],
        stride: usize,
        pad: usize,
    ) -> (Vec<f32>, [usize; 5]) {
        let ys = super::conv_out_shape(xs, ws[0], ws[2], stride, pad);
        let k = ws[2];
        let mut y = vec![0f32; ys.iter().product()];
        for n in 0..ys[0] {
            for co in 0..ys[1] {
                for qx in 0..ys[2] {
                    for qy in 0..ys[3] {
                        for qz in 0..ys[4] {
                            let mut acc = b[co] as f64;
                            for ci in 0..xs[1] {
                                for tx in 0..k {
                                    let Some(ix) = tap(qx, tx, stride, pad, xs[2]) else { continue };
                                    for ty in 0..k {
                                        let Some(iy) = tap(qy, ty, stride, pad, xs[3]) else { continue };
                                        for tz in 0..k {
                                            let Some(iz) = tap(qz, tz, stride, pad, xs[4]) else { continue };
                                            acc += x[idx(xs, n, ci, ix, iy, iz)] as f64
                                                * w[idx(ws, co, ci, tx, ty, tz)] as f64;
                                        }
                                    }
                                }
                            }
                            y[idx(ys, n, co, qx, qy, qz)] = acc as f32;
                        }
                    }
                }
            }
        }
        (y, ys)
    }

    /// Gradients (dx, dw, db) of conv3d given dy.
    pub fn conv3d_backward(
        x: &[f32],
        xs: [usize; 5],
        w: &[f32],
        ws: [usize; 5],
        dy: &[f32],
        stride: usize,
        pad: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let ys = super::conv_out_shape(xs, ws[0], ws[2], stride, pad);
        let k = ws[2];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        let mut db = vec![0f64; ws[0]];
        for n in 0..ys[0] {
            for co in 0..ys[1] {
                for qx in 0..ys[2] {
                    for qy in 0..ys[3] {
                        for qz in 0..ys[4] {
                            let g = dy[idx(ys, n, co, qx, qy, qz)] as f64;
                            db[co] += g;
                            for ci in 0..xs[1] {
                                for tx in 0..k {
                                    let Some(ix) = tap(qx, tx, stride, pad, xs[2]) else { continue };
                                    for ty in 0..k {
                                        let Some(iy) = tap(qy, ty, stride, pad, xs[3]) else { continue };
                                        for tz in 0..k {
                                            let Some(iz) = tap(qz, tz, stride, pad, xs[4]) else { continue };
                                            let (xi, wi) =
                                                (idx(xs, n, ci, ix, iy, iz), idx(ws, co, ci, tx, ty, tz));
                                            dx[xi] += g * w[wi] as f64;
                                            dw[wi] += g * x[xi] as f64;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
        (f(dx), f(dw), f(db))
    }

    /// conv_transpose3d, kernel 2 stride 2: x `[N, Cin, X, Y, Z]`, w `[Cin, Cout, 2, 2, 2]`, b `[Cout]`.
    pub fn conv_transpose3d(
        x: &[f32],
        xs: [usize; 5],
        w: &[f32],
        ws: [usize; 5],
        b: &[f32],
    ) -> (Vec<f32>, [usize; 5]) {
        let ys = [xs[0], ws[1], 2 * xs[2], 2 * xs[3], 2 * xs[4]];
        let mut y = vec![0f64; ys.iter().product()];
        for n in 0..ys[0] {
            for co in 0..ys[1] {
                for (ox, oy, oz) in cube(ys[2], ys[3], ys[4]) {
                    let mut acc = b[co] as f64;
                    for ci in 0..xs[1] {
                        acc += x[idx(xs, n, ci, ox / 2, oy / 2, oz / 2)] as f64
                            * w[idx(ws, ci, co, ox % 2, oy % 2, oz % 2)] as f64;
                    }
                    y[idx(ys, n, co, ox, oy, oz)] = acc;
                }
            }
        }
        (y.into_iter().map(|a| a as f32).collect(), ys)
    }

    /// Gradients (dx, dw, db) of conv_transpose3d given dy.
    pub fn conv_transpose3d_backward(
        x: &[f32],
        xs: [usize; 5],
        w: &[f32],
        ws: [usize; 5],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let ys = [xs[0], ws[1], 2 * xs[2], 2 * xs[3], 2 * xs[4]];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        let mut db = vec![0f64; ws[1]];
        for n in 0..ys[0] {
            for co in 0..ys[1] {
                for (ox, oy, oz) in cube(ys[2], ys[3], ys[4]) {
                    let g = dy[idx(ys, n, co, ox, oy, oz)] as f64;
                    db[co] += g;
                    for ci in 0..xs[1] {
                        let (xi, wi) =
                            (idx(xs, n, ci, ox / 2, oy / 2, oz / 2), idx(ws, ci, co, ox % 2, oy % 2, oz % 2));
                        dx[xi] += g * w[wi] as f64;
                        dw[wi] += g * x[xi] as f64;
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
        (f(dx), f(dw), f(db))
    }

    fn cube(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }
}

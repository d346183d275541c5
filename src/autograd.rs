//! Reverse-mode automatic differentiation. Every tensor made by an op on gradient-tracking inputs
//! remembers that op and its inputs; `backward` walks the recorded ops in reverse order of
//! creation (tensor ids grow with creation, so that order is topological) and applies the one
//! backward rule per op below. The graph is consumed as it is walked, freeing what the ops saved.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use crate::ops::elementwise::{BinaryOp, UnaryOp};
use crate::tensor::Tensor;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
    static HALF: Cell<bool> = const { Cell::new(false) };
    static RECOMPUTE_MIN: Cell<usize> = const { Cell::new(RECOMPUTE_MIN_ELEMS) };
}

/// Runs `f` with the thread-local `cell` set to `value`, restoring it afterwards (also on panic):
/// the scoped switches of recording, storage precision and the kernels' test overrides.
pub(crate) fn with_flag<T: Copy + 'static, R>(
    cell: &'static std::thread::LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(cell, cell.with(|c| c.replace(value)));
    f()
}

/// Runs `f` with the large activations that backward rules read (convolution, BatchNorm and
/// linear inputs) stored in f16 ([`crate::ops::half`]); the arithmetic stays f32.
pub fn with_f16_storage<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_flag(&HALF, on, f)
}

/// Tensors smaller than this are saved as they are.
const HALF_MIN_ELEMS: usize = 1 << 12;

/// Saved activations of at least this many elements (16 MiB in f32) that are BatchNorm outputs,
/// or sums, upsamplings or dropouts of them, are computed again when a backward rule reads them
/// rather than kept: the paper's preset holds 16 to 20 full-resolution activations at once.
/// Smaller ones are kept, where the extra launches cost more than the bytes save.
const RECOMPUTE_MIN_ELEMS: usize = 1 << 22;

/// Runs `f` with saved activations of at least `elems` elements recomputed when they can be
/// (0: every one; `usize::MAX`: none) instead of the default 2^22.
pub fn with_recompute_min<R>(elems: usize, f: impl FnOnce() -> R) -> R {
    with_flag(&RECOMPUTE_MIN, elems, f)
}

/// An op input that its backward reads: the tensor, or under [`with_f16_storage`] a graph handle
/// of it (no data) and its values in f16, so that the f32 buffer is freed with the forward; or,
/// for a large activation that [`recomputable`] says the ops before it can give again, the graph
/// handle alone.
pub(crate) struct Saved {
    pub(crate) t: Tensor,
    half: Option<Tensor>,
    recompute: bool,
}

impl Saved {
    /// Keeps `x` as it is, or a graph handle of a large recomputable activation; [`Op::pack_saved`]
    /// stores a kept tensor in f16 once the op is recorded.
    pub(crate) fn new(x: &Tensor) -> Saved {
        if x.numel() >= RECOMPUTE_MIN.with(|c| c.get()) && recomputable(x) {
            return Saved { t: x.graph_handle(), half: None, recompute: true };
        }
        Saved { t: x.clone(), half: None, recompute: false }
    }
    /// Under [`with_f16_storage`], trades a large f32 tensor for a graph handle and its f16 values.
    fn pack(&mut self) {
        let large = self.t.numel() >= HALF_MIN_ELEMS;
        if !self.recompute && self.half.is_none() && self.t.dtype() == crate::DType::F32 && large {
            self.half = Some(crate::ops::half::pack(&self.t));
            self.t = self.t.graph_handle();
        }
    }
    /// The values, as f32, tracking gradients when the saved tensor does (backward rules skip
    /// the gradient of an input that does not).
    pub(crate) fn values(&self) -> Tensor {
        let v = if self.recompute {
            no_grad(|| recompute(&self.t))
        } else if let Some(h) = &self.half {
            crate::ops::half::unpack(h, self.t.shape())
        } else {
            return self.t.clone();
        };
        if self.t.tracks_grad() { v.into_variable() } else { v }
    }
}

/// Whether the values of `t` can be computed again from what the recorded ops that made it keep
/// for their own backward: an output of a BatchNorm (and ReLU), which keeps its input and
/// statistics, and trilinear upsamplings, dropouts and sums of such outputs. A tensor read by a
/// backward rule is read before the rules of the ops that made it run (later ops first), so
/// those ops and what they saved are still there.
fn recomputable(t: &Tensor) -> bool {
    t.with_recorded_op(|op| match op {
        Some(Op::BatchNorm { .. }) => true,
        Some(Op::Upsample2x { x } | Op::Dropout { x, .. }) => recomputable(x),
        Some(Op::Binary { op: BinaryOp::Add, a, b }) => {
            a.shape() == b.shape() && recomputable(a) && recomputable(b)
        }
        _ => false,
    })
}

/// The values of a [`recomputable`] tensor, with the forward's kernels on the forward's inputs: the
/// same bits (except where f16 storage rounded a BatchNorm's input).
fn recompute(t: &Tensor) -> Tensor {
    t.with_recorded_op(|op| match op {
        Some(Op::BatchNorm { x, stats, relu, .. }) => {
            crate::ops::batchnorm::normalize(&x.values(), stats, *relu)
        }
        Some(Op::Upsample2x { x }) => crate::ops::upsample::upsample_trilinear2x(&recompute(x)),
        Some(Op::Dropout { x, p, seed, inner }) => {
            crate::ops::dropout::apply(&recompute(x), *p, *seed, *inner)
        }
        Some(Op::Binary { op: BinaryOp::Add, a, b }) => recompute(a).add(&recompute(b)),
        _ => unreachable!("a recomputed activation whose ops were already consumed by the backward pass"),
    })
}

pub fn is_enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Runs `f` without recording ops (inference, optimizer updates, backward rules themselves).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&ENABLED, false, f)
}

/// How a tensor was made. Saved outputs (`y`) are detached copies of the handle, so that no
/// tensor refers to itself.
pub(crate) enum Op {
    Binary {
        op: BinaryOp,
        a: Tensor,
        b: Tensor,
    },
    Unary {
        op: UnaryOp,
        x: Tensor,
        y: Tensor,
    },
    /// Sum over `axes`, keeping them as size-1 dimensions.
    Sum {
        x: Tensor,
    },
    MaxAxis {
        x: Tensor,
        axis: usize,
        arg: Tensor,
    },
    Matmul {
        a: Tensor,
        b: Tensor,
        ta: bool,
        tb: bool,
    },
    /// x [rows, in] W^T [in, out] + b, in one kernel; then ReLU when `relu` holds the output.
    Linear {
        x: Saved,
        w: Tensor,
        b: Tensor,
        relu: Option<Saved>,
        /// Rows selected by a mask: the weight gradient takes the tall-reduction kernel for any
        /// number of them ([`crate::ops::linear::linear_selected`]).
        selected: bool,
    },
    Softmax {
        x: Tensor,
        y: Tensor,
        axis: usize,
    },
    LogSoftmax {
        x: Tensor,
        y: Tensor,
        axis: usize,
    },
    Reshape {
        x: Tensor,
    },
    Permute {
        x: Tensor,
        perm: Vec<usize>,
    },
    Slice {
        x: Tensor,
        axis: usize,
        start: usize,
    },
    Concat {
        xs: Vec<Tensor>,
        axis: usize,
    },
    GatherRows {
        x: Tensor,
        index: Tensor,
    },
    /// Rows of an N, C, ... tensor across its channels at voxels `index` of samples n0 on.
    GatherVoxelRows {
        x: Tensor,
        n0: usize,
        index: Tensor,
    },
    /// The Gram matrix and column sums of rows x (or relu(x)) about `shift`, then those rows at
    /// `index`.
    GramRowsAt {
        x: Saved,
        shift: Tensor,
        index: Tensor,
        relu: bool,
    },
    /// BatchNorm over axis 1 (then ReLU when `relu`); `stats` [C, 4] = (mean, invstd, scale, bias)
    /// it normalized with, batch statistics when `train`.
    BatchNorm {
        x: Saved,
        weight: Tensor,
        bias: Tensor,
        stats: Tensor,
        train: bool,
        relu: bool,
    },
    /// The sharpened mutual consistency loss of two probability maps ([`crate::ops::consistency`]).
    Consistency {
        u: Tensor,
        w: Tensor,
        temperature: f32,
        detach_targets: bool,
    },
    /// Dropout of x seen as [units, inner]; the mask is regenerated from the seed.
    Dropout {
        x: Tensor,
        p: f32,
        seed: u64,
        inner: usize,
    },
    /// Trilinear x2 upsampling, align_corners=True.
    Upsample2x {
        x: Tensor,
    },
    /// Reference conv3d (or conv_transpose3d when `transposed`) with bias.
    ConvRef {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        stride: usize,
        padding: usize,
        transposed: bool,
    },
    /// conv3d with bias (PyTorch semantics, cubic kernel). `bias_cancels`: the output feeds a
    /// BatchNorm in training mode, which subtracts the batch mean and with it the bias, so the
    /// bias gradient is zero (the reference's float sum of that gradient is rounding noise).
    Conv3d {
        x: Saved,
        w: Tensor,
        b: Tensor,
        stride: usize,
        padding: usize,
        bias_cancels: bool,
    },
    /// conv_transpose3d with kernel = stride = 2 and bias; w [Cin, Cout, 2, 2, 2].
    ConvTranspose3d {
        x: Saved,
        w: Tensor,
        b: Tensor,
        bias_cancels: bool,
    },
    /// LayerNorm over the last axis; `mean` and `rstd` per row.
    LayerNorm {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        mean: Tensor,
        rstd: Tensor,
    },
    /// Fused self-attention over packed q | k | v; `lse` = logsumexp of each score row.
    Attention {
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        heads: usize,
        dropout: Option<crate::ops::attention::HashDropout>,
    },
    /// sum(-softmax(la / t) * log(softmax(lv / t) + eps)) / rows over logits [rows, cols]; only
    /// the logits are kept, the softmaxes are recomputed in the backward.
    SoftmaxXent {
        lv: Tensor,
        la: Tensor,
        temperature: f32,
        eps: f32,
    },
}

impl Op {
    /// Called once the op is recorded: under [`with_f16_storage`], its saved inputs go to f16
    /// (ops that are not recorded keep nothing, so nothing is packed for them).
    pub(crate) fn pack_saved(&mut self) {
        if !HALF.with(|h| h.get()) {
            return;
        }
        match self {
            Op::Linear { x, relu, .. } => {
                x.pack();
                if let Some(y) = relu {
                    y.pack();
                }
            }
            Op::BatchNorm { x, .. }
            | Op::GramRowsAt { x, .. }
            | Op::Conv3d { x, .. }
            | Op::ConvTranspose3d { x, .. } => x.pack(),
            _ => {}
        }
    }

    pub(crate) fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Binary { a, b, .. } | Op::Matmul { a, b, .. } => vec![a, b],
            Op::Consistency { u, w, .. } => vec![u, w],
            Op::Unary { x, .. }
            | Op::Sum { x }
            | Op::MaxAxis { x, .. }
            | Op::Softmax { x, .. }
            | Op::LogSoftmax { x, .. }
            | Op::Reshape { x }
            | Op::Permute { x, .. }
            | Op::Slice { x, .. }
            | Op::GatherRows { x, .. }
            | Op::GatherVoxelRows { x, .. }
            | Op::Dropout { x, .. }
            | Op::Upsample2x { x } => vec![x],
            Op::BatchNorm { x, weight, bias, .. } => vec![&x.t, weight, bias],
            Op::Linear { x, w, b, .. } => vec![&x.t, w, b],
            Op::GramRowsAt { x, .. } => vec![&x.t],
            Op::ConvRef { x, w, b, .. } => vec![x, w, b],
            Op::Conv3d { x, w, b, .. } | Op::ConvTranspose3d { x, w, b, .. } => vec![&x.t, w, b],
            Op::LayerNorm { x, w, b, .. } => vec![x, w, b],
            Op::Attention { qkv, .. } => vec![qkv],
            Op::SoftmaxXent { lv, la, .. } => vec![lv, la],
            Op::Concat { xs, .. } => xs.iter().collect(),
        }
    }

    /// Gradients of the inputs (in `inputs()` order) given the gradient `g` of the output `out`.
    fn backward(&self, g: &Tensor) -> Vec<Option<Tensor>> {
        use crate::ops::{
            attention, batchnorm, conv, conv_ref, dropout, elementwise as ew, layernorm, layout, matmul,
            moments, reduce, upsample,
        };
        match self {
            Op::Binary { op, a, b } => {
                let (ga, gb) = match op {
                    BinaryOp::Add => (g.clone(), g.clone()),
                    BinaryOp::Sub => (g.clone(), g.neg()),
                    BinaryOp::Mul => (g.mul(b), g.mul(a)),
                    BinaryOp::Div => {
                        let ga = g.div(b);
                        (ga.clone(), ga.mul(a).div(b).neg())
                    }
                    BinaryOp::Maximum => {
                        let pick_a = a.ge(b);
                        (g.mul(&pick_a), g.mul(&pick_a.affine(-1.0, 1.0)))
                    }
                    BinaryOp::Eq | BinaryOp::Gt | BinaryOp::Ge => unreachable!("comparisons record no op"),
                };
                vec![
                    a.tracks_grad().then(|| reduce::sum_to(&ga, a.shape())),
                    b.tracks_grad().then(|| reduce::sum_to(&gb, b.shape())),
                ]
            }
            Op::Unary { op, x, y } => vec![Some(ew::unary_grad(*op, x, y, g))],
            Op::Sum { x } => vec![Some(reduce::expand_to(g, x.shape()))],
            Op::MaxAxis { x, axis, arg } => vec![Some(reduce::max_axis_grad(g, arg, x.shape(), *axis))],
            Op::Matmul { a, b, ta, tb } => {
                // C = op(A) op(B): dA = dC op(B)^T (transposed back when A was), likewise dB.
                let ga = a.tracks_grad().then(|| match ta {
                    false => matmul::matmul_t(g, b, false, !tb),
                    true => matmul::matmul_t(b, g, *tb, true),
                });
                let gb = b.tracks_grad().then(|| match tb {
                    false => matmul::matmul_t(a, g, !ta, false),
                    true => matmul::matmul_t(g, a, true, *ta),
                });
                let ga = ga.map(|t| reduce::sum_to(&t, a.shape()));
                let gb = gb.map(|t| reduce::sum_to(&t, b.shape()));
                vec![ga, gb]
            }
            Op::Softmax { y, axis, .. } => vec![Some(reduce::softmax_grad(y, g, *axis, false))],
            Op::LogSoftmax { y, axis, .. } => vec![Some(reduce::softmax_grad(y, g, *axis, true))],
            Op::Reshape { x } => vec![Some(g.reshape(x.shape()))],
            Op::Permute { perm, .. } => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                vec![Some(g.permute(&inv))]
            }
            Op::Slice { x, axis, start } => vec![Some(layout::pad_axis(g, *axis, *start, x.dim(*axis)))],
            Op::Concat { xs, axis } => {
                let mut at = 0;
                xs.iter()
                    .map(|x| {
                        let part = x.tracks_grad().then(|| g.narrow(*axis, at, x.dim(*axis)));
                        at += x.dim(*axis);
                        part
                    })
                    .collect()
            }
            Op::Linear { x, w, b, relu, selected } => {
                let relu_grad = relu.as_ref().map(|y| {
                    let y = y.values();
                    ew::unary_grad(UnaryOp::Relu, &y, &y, g)
                });
                let g = relu_grad.as_ref().unwrap_or(g);
                let gx = x.t.tracks_grad().then(|| matmul::matmul_t(g, w, false, false));
                let &[rows, out] = g.shape() else { unreachable!("linear gradient {:?}", g.shape()) };
                let inp = w.dim(1);
                let tall = if *selected {
                    rows > 0 && matmul::tall_tn_takes(out, inp)
                } else {
                    matmul::tall_tn_fits(rows, out, inp)
                };
                if w.tracks_grad() && b.tracks_grad() && tall && matmul::each_fits(&[g.numel(), x.t.numel()])
                {
                    // The weight and bias gradients from one pass over the rows.
                    let (gw, gb) = matmul::tall_tn(g, &x.values(), true);
                    vec![gx, Some(gw), gb]
                } else {
                    vec![
                        gx,
                        w.tracks_grad().then(|| matmul::matmul_t(g, &x.values(), true, false)),
                        b.tracks_grad().then(|| reduce::sum_to(g, b.shape())),
                    ]
                }
            }
            Op::GatherRows { x, index } => vec![Some(layout::scatter_add_rows(g, index, x.dim(0)))],
            Op::GatherVoxelRows { x, n0, index } => {
                vec![Some(layout::scatter_voxel_rows(g, x.shape(), *n0, index))]
            }
            Op::GramRowsAt { x, shift, index, relu } => {
                vec![Some(moments::gram_rows_at_grad(&x.values(), shift, index, g, *relu))]
            }
            Op::BatchNorm { x, weight, stats, train, relu, .. } => {
                batchnorm::batch_norm_grad(&x.values(), weight, stats, g, *train, *relu).map(Some).into()
            }
            Op::Consistency { u, w, temperature, detach_targets } => {
                crate::ops::consistency::consistency_grad(u, w, g, *temperature, *detach_targets)
                    .map(Some)
                    .into()
            }
            Op::Dropout { p, seed, inner, .. } => vec![Some(dropout::dropout_grad(g, *p, *seed, *inner))],
            Op::Upsample2x { x } => vec![Some(upsample::upsample_trilinear2x_grad(g, x.shape()))],
            Op::ConvRef { x, w, stride, padding, transposed, .. } => {
                conv_ref::conv_ref_grad(x, w, g, *stride, *padding, *transposed).map(Some).into()
            }
            Op::Conv3d { x, w, b, stride, padding, bias_cancels } => {
                conv::conv3d_backward(g, &x.values(), w, b, *stride, *padding, *bias_cancels)
            }
            Op::ConvTranspose3d { x, w, b, bias_cancels } => {
                conv::conv_transpose3d_backward(g, &x.values(), w, b, *bias_cancels)
            }
            Op::LayerNorm { x, w, mean, rstd, .. } => {
                let (dx, dw, db) = layernorm::layer_norm_grad(x, w, mean, rstd, g);
                vec![Some(dx), Some(dw), Some(db)]
            }
            Op::Attention { qkv, out, lse, heads, dropout } => {
                vec![Some(attention::attention_grad(qkv, out, lse, g, *heads, *dropout))]
            }
            Op::SoftmaxXent { lv, la, temperature, eps } => {
                let (dv, da) = reduce::softmax_xent_grad(lv, la, *temperature, *eps, g);
                vec![lv.tracks_grad().then_some(dv), la.tracks_grad().then_some(da)]
            }
        }
    }
}

/// The gradients of the leaves (variables) of a graph.
#[derive(Default)]
pub struct Grads(HashMap<u64, Tensor>);

impl Grads {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Gradients of the scalar `root` with respect to every variable it depends on.
pub fn backward(root: &Tensor) -> Grads {
    assert_eq!(root.numel(), 1, "backward needs a scalar, got shape {:?}", root.shape());
    // Every tensor reachable through recorded ops.
    let mut nodes: Vec<Tensor> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(t) = stack.pop() {
        if !t.tracks_grad() || !seen.insert(t.id()) {
            continue;
        }
        stack.extend(t.op_inputs());
        nodes.push(t);
    }
    nodes.sort_by_key(|t| std::cmp::Reverse(t.id()));
    no_grad(|| {
        let mut pending: HashMap<u64, Tensor> = HashMap::new();
        pending.insert(root.id(), Tensor::full(root.shape(), 1.0));
        let mut out = Grads::default();
        for node in nodes {
            let Some(g) = pending.remove(&node.id()) else { continue };
            // Taking the op out frees what it saved once its gradients are computed.
            match node.take_op() {
                Some(op) => {
                    let grads = op.backward(&g);
                    for (input, grad) in op.inputs().into_iter().zip(grads) {
                        let Some(grad) = grad else { continue };
                        if !input.tracks_grad() {
                            continue;
                        }
                        debug_assert_eq!(grad.shape(), input.shape(), "gradient shape of {input:?}");
                        let acc = match pending.remove(&input.id()) {
                            Some(prev) => prev.add(&grad),
                            None => grad,
                        };
                        pending.insert(input.id(), acc);
                    }
                }
                None => {
                    out.0.insert(node.id(), g);
                }
            }
        }
        out
    })
}

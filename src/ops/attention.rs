//! Multi-head scaled dot-product self-attention over packed projections, as inside PyTorch's
//! `nn.MultiheadAttention`: out = dropout(softmax(q k^T / sqrt(Dh))) v per head.
//!
//! `attention` is one fused kernel (flash-attention scheme: online softmax, logsumexp saved, the
//! backward recomputing probabilities), so the L x L scores are never stored; `attention_composed`
//! is the same function built from matmul, softmax and matmul, the reference the tests compare
//! against. Dropout masks come from a counter-based hash of (seed, sequence * H + head, row, col):
//! `dropout_mask` materializes the mask the fused kernels apply.

use std::cell::Cell;

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
use crate::ops::matmul::matmul_t;
use crate::tensor::Tensor;

/// Dropout with probability `p` whose mask is a pure function of `seed` and the entry's position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HashDropout {
    pub p: f32,
    pub seed: u64,
}

impl HashDropout {
    /// Entries whose hash is below this are dropped.
    fn threshold(&self) -> u32 {
        assert!((0.0..1.0).contains(&self.p), "dropout probability {} outside [0, 1)", self.p);
        ((self.p as f64 * 4_294_967_296.0).round() as u64).min(u32::MAX as u64) as u32
    }
    fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

/// Largest head width the kernels hold in registers.
pub const MAX_HEAD_DIM: usize = 32;

/// Invocations per workgroup of the attention kernels.
const WG: usize = 64;

/// Invocations per (sequence, head, block of rows), each holding 4 rows: 64, or fewer for short
/// sequences (the inter-sample attention has 4 tokens: one invocation, 64 sequences a workgroup).
fn group_size(len: usize) -> usize {
    len.div_ceil(4).next_power_of_two().min(WG)
}

struct Launch {
    params: Params,
    group: usize,
    bk: usize,
    dropout: bool,
    d4: usize,
    workgroups: usize,
    /// Ranges the other side's tokens are split into, each summed into its own partial result.
    splits: usize,
}

thread_local! {
    static FORCED_SPLITS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` with the kernels splitting the other side's tokens into (about) `n` ranges, whatever
/// the adapter (tests: a software device otherwise never splits).
pub fn with_splits<R>(n: usize, f: impl FnOnce() -> R) -> R {
    crate::autograd::with_flag(&FORCED_SPLITS, Some(n.max(1)), f)
}

/// (seqs, len, d) of qkv [S, L, 3d], checked.
fn dims(qkv: &Tensor, heads: usize) -> (usize, usize, usize) {
    let &[s, l, d3] = qkv.shape() else { panic!("attention input {:?}: [S, L, 3d] expected", qkv.shape()) };
    let d = d3 / 3;
    assert!(d3 % 3 == 0 && heads > 0 && d % heads == 0, "attention: 3d = {d3} with {heads} heads");
    let dh = d / heads;
    assert!(
        dh.is_multiple_of(4) && dh <= MAX_HEAD_DIM,
        "attention head width {dh}: a multiple of 4 up to 32"
    );
    assert!(l > 0, "attention over an empty sequence");
    (s, l, d)
}

fn launch(s: usize, l: usize, d: usize, heads: usize, dropout: Option<HashDropout>) -> Launch {
    let group = group_size(l);
    let blocks = l.div_ceil(4 * group);
    let dh = d / heads;
    // A GPU wants more invocations than (sequence, head, row block)s: split the other side's
    // tokens into ranges of at least 64 until the adapter is filled.
    let invocations = s * heads * blocks * group;
    let want = FORCED_SPLITS
        .with(|c| c.get())
        .unwrap_or_else(|| gpu().fill_invocations().div_ceil(invocations).min(l.div_ceil(64)).max(1));
    let bk = l.min(8);
    let span = l.div_ceil(want).next_multiple_of(bk);
    let splits = l.div_ceil(span);
    let (threshold, keep_scale, seed) = match dropout {
        Some(dr) if dr.p > 0.0 => (dr.threshold(), dr.keep_scale(), dr.seed),
        _ => (0, 1.0, 0),
    };
    let params = Params::new()
        .u(s)
        .u(l)
        .u(heads)
        .u(d / 4)
        .f(1.0 / (dh as f32).sqrt())
        .u(threshold as usize)
        .f(keep_scale)
        .u((seed & 0xffff_ffff) as usize)
        .u((seed >> 32) as usize)
        .u(blocks)
        .u(splits)
        .u(span);
    Launch {
        params,
        group,
        bk,
        dropout: threshold > 0,
        d4: dh / 4,
        workgroups: (invocations * splits).div_ceil(WG),
        splits,
    }
}

impl Launch {
    fn kernel(&self, entry: &'static str, dk: bool) -> Kernel {
        Kernel::new("attention", entry)
            .with("GROUP", self.group as f64)
            .with("BK", self.bk as f64)
            .with("D4", self.d4 as f64)
            .with("DROPOUT", self.dropout as u8 as f64)
            .with("DK", dk as u8 as f64)
    }
    fn run(&self, entry: &'static str, dk: bool, buffers: &[crate::gpu::Binding]) {
        let g = gpu();
        g.dispatch(
            &self.kernel(entry, dk),
            self.params.bytes(),
            buffers,
            g.groups_1d(self.workgroups as u64, 1),
        );
    }
}

/// qkv [S, L, 3d] (q | k | v per token, heads side by side in each) -> [S, L, d]: self-attention
/// of each of the S sequences over its L tokens, `heads` heads, scale 1/sqrt(d / heads).
pub fn attention(qkv: &Tensor, heads: usize, dropout: Option<HashDropout>) -> Tensor {
    let (s, l, d) = dims(qkv, heads);
    let la = launch(s, l, d, heads, dropout);
    let out = Tensor::empty(&[s, l, d]);
    let lse = Tensor::empty(&[s * heads, l]);
    if la.splits == 1 {
        la.run("forward", false, &[qkv.binding(), out.binding(), lse.binding()]);
    } else {
        let parts = Tensor::empty(&[la.splits * s, l, d]);
        let lse_parts = Tensor::empty(&[la.splits * s * heads, l]);
        la.run("forward", false, &[qkv.binding(), parts.binding(), lse_parts.binding()]);
        let g = gpu();
        g.dispatch(
            &la.kernel("combine", false),
            la.params.bytes(),
            &[parts.binding(), lse_parts.binding(), out.binding(), lse.binding()],
            g.groups_1d((s * heads * l) as u64, 64),
        );
    }
    let saved = out.detach();
    Tensor::with_op(out, Op::Attention { qkv: qkv.clone(), out: saved, lse, heads, dropout })
}

/// dL/dqkv of `attention` given dL/dout `g`, the forward's output and logsumexp.
pub(crate) fn attention_grad(
    qkv: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    heads: usize,
    dropout: Option<HashDropout>,
) -> Tensor {
    let (s, l, d) = dims(qkv, heads);
    let la = launch(s, l, d, heads, dropout);
    // With splits, split i writes the i-th [S, L, 3d] slice, and the slices are summed.
    let dqkv = Tensor::empty(&[la.splits * s, l, 3 * d]);
    let delta = Tensor::empty(&[s * heads, l]);
    let gp = gpu();
    gp.dispatch(
        &la.kernel("delta", false),
        la.params.bytes(),
        &[out.binding(), g.binding(), delta.binding()],
        gp.groups_1d((s * heads * l) as u64, 64),
    );
    la.run(
        "backward_q",
        false,
        &[qkv.binding(), g.binding(), lse.binding(), delta.binding(), dqkv.binding()],
    );
    // dK and dV in two launches: fewer registers live in each.
    for dk in [true, false] {
        la.run(
            "backward_kv",
            dk,
            &[qkv.binding(), g.binding(), lse.binding(), delta.binding(), dqkv.binding()],
        );
    }
    if la.splits == 1 {
        return dqkv;
    }
    crate::ops::reduce::sum_middle(&dqkv, 1, la.splits, s * l * 3 * d).reshape(qkv.shape())
}

/// The dropout factors (0 or 1 / (1 - p)) of entries (b, r, c) of a [B, R, C] tensor, the same
/// that the fused kernels apply to probability (b = sequence * H + head, row, col).
pub fn dropout_mask(dropout: HashDropout, shape: [usize; 3]) -> Tensor {
    let [b, r, c] = shape;
    let mask = Tensor::empty(&shape);
    let p = Params::new()
        .u(b)
        .u(r)
        .u(c)
        .u(dropout.threshold() as usize)
        .f(dropout.keep_scale())
        .u((dropout.seed & 0xffff_ffff) as usize)
        .u((dropout.seed >> 32) as usize);
    gpu().dispatch_1d(
        &Kernel::new("attention", "dropout_mask"),
        p.bytes(),
        &[mask.binding()],
        mask.numel() as u64,
    );
    mask
}

/// The reference composition of `attention`: per head, softmax(q k^T * scale) (times the same
/// dropout mask) @ v, with matmul, softmax and layout ops. Stores the [S*H, L, L] scores.
pub fn attention_composed(qkv: &Tensor, heads: usize, dropout: Option<HashDropout>) -> Tensor {
    let (s, l, d) = dims(qkv, heads);
    let dh = d / heads;
    let part = |i: usize| {
        qkv.narrow(2, i * d, d).reshape(&[s, l, heads, dh]).permute(&[0, 2, 1, 3]).reshape(&[
            s * heads,
            l,
            dh,
        ])
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let mut probs = matmul_t(&q, &k, false, true).mul_scalar(1.0 / (dh as f32).sqrt()).softmax(2);
    if let Some(dr) = dropout.filter(|dr| dr.p > 0.0) {
        probs = probs.mul(&dropout_mask(dr, [s * heads, l, l]));
    }
    probs.matmul(&v).reshape(&[s, heads, l, dh]).permute(&[0, 2, 1, 3]).reshape(&[s, l, d])
}

/// CPU references: the hash, the mask and attention itself (f64 arithmetic).
pub mod cpu {
    use super::HashDropout;

    /// The shader's mixer (lowbias32 after adding the golden-ratio constant).
    pub fn mix32(v: u32) -> u32 {
        let mut x = v.wrapping_add(0x9e37_79b9);
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        x
    }

    /// The dropout factor of entry (b, row, col): 0 or 1 / (1 - p).
    pub fn keep_factor(dr: HashDropout, b: u32, row: u32, col: u32) -> f32 {
        let (lo, hi) = (dr.seed as u32, (dr.seed >> 32) as u32);
        let rk = mix32(mix32(mix32(lo ^ mix32(hi)) ^ b) ^ row);
        if mix32(rk ^ mix32(col)) >= dr.threshold() { dr.keep_scale() } else { 0.0 }
    }

    pub fn dropout_mask(dr: HashDropout, [b, r, c]: [usize; 3]) -> Vec<f32> {
        (0..b * r * c)
            .map(|i| keep_factor(dr, (i / (r * c)) as u32, ((i / c) % r) as u32, (i % c) as u32))
            .collect()
    }

    /// qkv [s, l, 3d] -> [s, l, d], as `super::attention`.
    pub fn attention(
        qkv: &[f32],
        [s, l, d]: [usize; 3],
        heads: usize,
        dropout: Option<HashDropout>,
    ) -> Vec<f32> {
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let at = |si: usize, t: usize, part: usize, h: usize, c: usize| {
            qkv[(si * l + t) * 3 * d + part * d + h * dh + c] as f64
        };
        let mut out = vec![0f32; s * l * d];
        for si in 0..s {
            for h in 0..heads {
                for i in 0..l {
                    let scores: Vec<f64> = (0..l)
                        .map(|j| {
                            (0..dh).map(|c| at(si, i, 0, h, c) * at(si, j, 1, h, c)).sum::<f64>() * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    // Probabilities after dropout.
                    let probs: Vec<f64> = scores
                        .iter()
                        .enumerate()
                        .map(|(j, x)| {
                            let keep = dropout.filter(|dr| dr.p > 0.0).map_or(1.0, |dr| {
                                keep_factor(dr, (si * heads + h) as u32, i as u32, j as u32) as f64
                            });
                            (x - m).exp() / z * keep
                        })
                        .collect();
                    for c in 0..dh {
                        let acc: f64 = probs.iter().enumerate().map(|(j, pr)| pr * at(si, j, 2, h, c)).sum();
                        out[(si * l + i) * d + h * dh + c] = acc as f32;
                    }
                }
            }
        }
        out
    }
}

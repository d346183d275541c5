//! Elementwise ops: add, sub, mul, div, maximum and comparisons with broadcasting; unary maps
//! (relu, exp, log, sqrt, pow, clamp, affine) and their gradients; fill.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, Tiling, align_elems, binding_limit, range_binding, strides, too_large};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    /// 1.0 where equal, else 0.0 (no gradient).
    Eq,
    Gt,
    Ge,
}

impl BinaryOp {
    fn code(self) -> u32 {
        self as u32
    }
    fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Eq | BinaryOp::Gt | BinaryOp::Ge)
    }
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Maximum => a.max(b),
            BinaryOp::Eq => (a == b) as u8 as f64,
            BinaryOp::Gt => (a > b) as u8 as f64,
            BinaryOp::Ge => (a >= b) as u8 as f64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Relu,
    Exp,
    Log,
    Sqrt,
    Pow(f32),
    Clamp(f32, f32),
    /// a * x + b
    Affine(f32, f32),
}

impl UnaryOp {
    fn code_and_scalars(self) -> (u32, f32, f32) {
        match self {
            UnaryOp::Relu => (0, 0.0, 0.0),
            UnaryOp::Exp => (1, 0.0, 0.0),
            UnaryOp::Log => (2, 0.0, 0.0),
            UnaryOp::Sqrt => (3, 0.0, 0.0),
            UnaryOp::Pow(e) => (4, e, 0.0),
            UnaryOp::Clamp(lo, hi) => (5, lo, hi),
            UnaryOp::Affine(a, b) => (6, a, b),
        }
    }
    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Pow(e) => x.powf(e as f64),
            UnaryOp::Clamp(lo, hi) => x.clamp(lo as f64, hi as f64),
            UnaryOp::Affine(a, b) => a as f64 * x + b as f64,
        }
    }
}

/// The broadcast shape of two shapes (aligned at the right, numpy rules).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            assert!(da == db || da == 1 || db == 1, "shapes {a:?} and {b:?} do not broadcast");
            da.max(db)
        })
        .collect()
}

/// Strides of `shape` read at the positions of `out` (0 along broadcast axes).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { st[i - off] }).collect()
}

/// Merges adjacent axes along which both operands are laid out contiguously (or both broadcast),
/// so that a broadcast launch does as few index divisions as the layout allows.
pub fn collapse(shape: &[usize], sa: &[usize], sb: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut d, mut a, mut b) = (vec![shape[0]], vec![sa[0]], vec![sb[0]]);
    for i in 1..shape.len() {
        let last = d.len() - 1;
        let joins = |st: &[usize], merged: usize| st[i] * shape[i] == merged;
        if joins(sa, a[last]) && joins(sb, b[last]) {
            d[last] *= shape[i];
            a[last] = sa[i];
            b[last] = sb[i];
        } else {
            d.push(shape[i]);
            a.push(sa[i]);
            b.push(sb[i]);
        }
    }
    (d, a, b)
}

/// The elementwise kernel `entry` for the range [start, start + len) and its invocations: its
/// four-values-per-invocation twin `entry4` (vector loads) where the range is whole vectors.
fn per_lane(entry: &'static str, entry4: &'static str, start: usize, len: usize) -> (Kernel, usize) {
    if start.is_multiple_of(4) && len.is_multiple_of(4) {
        (Kernel::new("elementwise", entry4), len / 4)
    } else {
        (Kernel::new("elementwise", entry), len)
    }
}

/// Runs `f(start, len)` over element ranges that each fit one storage binding.
fn for_chunks(n: usize, mut f: impl FnMut(usize, usize)) {
    let align = align_elems();
    let chunk = ((binding_limit() / 4) as usize / align * align).max(align);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        f(start, len);
        start += len;
    }
}

pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
    assert!(a.dtype() == DType::F32 && b.dtype() == DType::F32, "{op:?} on {a:?} and {b:?}");
    let shape = broadcast_shape(a.shape(), b.shape());
    let out = Tensor::empty(&shape);
    let n = out.numel();
    let g = gpu();
    if a.shape() == b.shape() {
        for_chunks(n, |s, len| {
            let (k, lanes) = per_lane("binary", "binary4", s, len);
            let p = Params::new().u(lanes).u(0).f(0.0).f(0.0);
            g.dispatch_1d(
                &k.with("OP", op.code() as f64),
                p.bytes(),
                &[range_binding(a, s, len), range_binding(b, s, len), range_binding(&out, s, len)],
                lanes as u64,
            );
        });
    } else {
        broadcast(op.code(), a, b, &out);
    }
    if op.is_comparison() {
        return out;
    }
    // Sums and differences need only the operands' shapes in the backward.
    let keep =
        |t: &Tensor| if matches!(op, BinaryOp::Add | BinaryOp::Sub) { t.graph_handle() } else { t.clone() };
    Tensor::with_op(out, Op::Binary { op, a: keep(a), b: keep(b) })
}

/// out = op(a, b) with a and b broadcast to out's shape (op 8 copies b), over boxes of the output
/// whose footprints fit one binding each: output boxes are contiguous, since the axis cut first
/// is always the outermost one still longer than 1.
pub(crate) fn broadcast(code: u32, a: &Tensor, b: &Tensor, out: &Tensor) {
    let shape = if out.rank() == 0 { &[1][..] } else { out.shape() };
    if out.numel() == 0 {
        return;
    }
    let k = Kernel::new("elementwise", "binary").with("OP", code as f64).with("BROADCAST", 1.0);
    let (dims, sa, sb) =
        collapse(shape, &broadcast_strides(a.shape(), shape), &broadcast_strides(b.shape(), shape));
    let so = strides(&dims);
    let tiles = Tiling::new(&dims).tensor(&so).tensor(&sa).tensor(&sb).split();
    let tiles = tiles.unwrap_or_else(|e| too_large("broadcast", out, &e, "one element"));
    for t in tiles {
        let ((out_b, out_off), (a_b, a_off), (b_b, b_off)) =
            (t.bind(out, 0, &so), t.bind(a, 0, &sa), t.bind(b, 0, &sb));
        debug_assert_eq!(t.span(&so), t.count(), "output boxes are contiguous");
        let p = Params::new().u(t.count()).u(dims.len()).f(0.0).f(0.0).dims8(&t.len).dims8(&sa).dims8(&sb);
        let p = p.u(a_off).u(b_off).u(out_off);
        gpu().dispatch_1d(&k, p.bytes(), &[a_b, b_b, out_b], t.count() as u64);
    }
}

pub fn unary(op: UnaryOp, x: &Tensor) -> Tensor {
    assert_eq!(x.dtype(), DType::F32, "{op:?} on {x:?}");
    let out = Tensor::empty(x.shape());
    let (code, s0, s1) = op.code_and_scalars();
    for_chunks(x.numel(), |s, len| {
        let (k, lanes) = per_lane("unary", "unary4", s, len);
        let p = Params::new().u(lanes).u(0).f(s0).f(s1);
        gpu().dispatch_1d(
            &k.with("OP", code as f64),
            p.bytes(),
            &[range_binding(x, s, len), range_binding(&out, s, len)],
            lanes as u64,
        );
    });
    let y = out.detach();
    Tensor::with_op(out, Op::Unary { op, x: x.clone(), y })
}

/// dL/dx of y = op(x), given dL/dy.
pub(crate) fn unary_grad(op: UnaryOp, x: &Tensor, y: &Tensor, g: &Tensor) -> Tensor {
    let out = Tensor::empty(x.shape());
    let (code, s0, s1) = op.code_and_scalars();
    let k = Kernel::new("elementwise", "unary_grad").with("OP", code as f64);
    for_chunks(x.numel(), |s, len| {
        let p = Params::new().u(len).u(0).f(s0).f(s1);
        let b = [
            range_binding(x, s, len),
            range_binding(y, s, len),
            range_binding(g, s, len),
            range_binding(&out, s, len),
        ];
        gpu().dispatch_1d(&k, p.bytes(), &b, len as u64);
    });
    out
}

pub fn fill(t: &Tensor, value: f32) {
    for_chunks(t.numel(), |s, len| {
        let (k, lanes) = per_lane("fill", "fill4", s, len);
        let p = Params::new().u(lanes).u(0).f(value).f(0.0);
        gpu().dispatch_1d(&k, p.bytes(), &[range_binding(t, s, len)], lanes as u64);
    });
}

impl Tensor {
    pub fn add(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Add, self, o)
    }
    pub fn sub(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Sub, self, o)
    }
    pub fn mul(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Mul, self, o)
    }
    pub fn div(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Div, self, o)
    }
    pub fn maximum(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Maximum, self, o)
    }
    /// 1.0 where `self == o`, else 0.0; carries no gradient.
    pub fn eq(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Eq, self, o)
    }
    pub fn gt(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Gt, self, o)
    }
    pub fn ge(&self, o: &Tensor) -> Tensor {
        binary(BinaryOp::Ge, self, o)
    }
    pub fn relu(&self) -> Tensor {
        unary(UnaryOp::Relu, self)
    }
    pub fn exp(&self) -> Tensor {
        unary(UnaryOp::Exp, self)
    }
    pub fn log(&self) -> Tensor {
        unary(UnaryOp::Log, self)
    }
    pub fn sqrt(&self) -> Tensor {
        unary(UnaryOp::Sqrt, self)
    }
    pub fn powf(&self, e: f32) -> Tensor {
        unary(UnaryOp::Pow(e), self)
    }
    pub fn clamp(&self, lo: f32, hi: f32) -> Tensor {
        unary(UnaryOp::Clamp(lo, hi), self)
    }
    /// a * self + b
    pub fn affine(&self, a: f32, b: f32) -> Tensor {
        unary(UnaryOp::Affine(a, b), self)
    }
    pub fn add_scalar(&self, s: f32) -> Tensor {
        self.affine(1.0, s)
    }
    pub fn mul_scalar(&self, s: f32) -> Tensor {
        self.affine(s, 0.0)
    }
    pub fn neg(&self) -> Tensor {
        self.affine(-1.0, 0.0)
    }
}

/// CPU references (f64 arithmetic) for the tests.
pub mod cpu {
    use super::*;

    pub fn binary(op: BinaryOp, a: &[f32], sa: &[usize], b: &[f32], sb: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let shape = broadcast_shape(sa, sb);
        let (ta, tb) = (broadcast_strides(sa, &shape), broadcast_strides(sb, &shape));
        let n: usize = shape.iter().product();
        let out = (0..n)
            .map(|i| {
                let (mut r, mut ia, mut ib) = (i, 0, 0);
                for d in (0..shape.len()).rev() {
                    let c = r % shape[d];
                    r /= shape[d];
                    ia += c * ta[d];
                    ib += c * tb[d];
                }
                op.apply(a[ia] as f64, b[ib] as f64) as f32
            })
            .collect();
        (out, shape)
    }

    pub fn unary(op: UnaryOp, x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| op.apply(v as f64) as f32).collect()
    }
}

//! Batched matrix product with optional transposes of either operand.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{MAX_LOOP, Params, Tiling, too_large};
use crate::tensor::Tensor;

/// The (batch, rows, cols) of a rank-2 or rank-3 operand, transposed when `t`.
fn dims(x: &Tensor, t: bool) -> (usize, usize, usize) {
    let (b, r, c) = match x.shape() {
        [r, c] => (1, *r, *c),
        [b, r, c] => (*b, *r, *c),
        s => panic!("matmul operand of shape {s:?}: rank 2 or 3 expected"),
    };
    if t { (b, c, r) } else { (b, r, c) }
}

/// op(a) @ op(b), op = transpose where `ta`/`tb`; [B, M, K] x [B, K, N] -> [B, M, N], a rank-2
/// operand shared over the batch.
pub fn matmul_t(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Tensor {
    let (ba, m, k) = dims(a, ta);
    let (bb, k2, n) = dims(b, tb);
    assert_eq!(k, k2, "matmul inner dimensions differ: {:?} x {:?} (ta {ta}, tb {tb})", a.shape(), b.shape());
    assert!(ba == bb || ba == 1 || bb == 1, "matmul batch sizes {ba} and {bb}");
    let batch = ba.max(bb);
    let shape = if a.rank() == 3 || b.rank() == 3 { vec![batch, m, n] } else { vec![m, n] };
    let out = if k == 0 { Tensor::zeros(&shape) } else { Tensor::empty(&shape) };
    let stride_a = if a.rank() == 3 && ba > 1 { m * k } else { 0 };
    let stride_b = if b.rank() == 3 && bb > 1 { k * n } else { 0 };
    let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
    // Boxes of (batch, M, N, K), K last: a box past K's first range adds to C.
    let sa = [stride_a, if ta { 1 } else { lda }, 0, if ta { lda } else { 1 }];
    let sb = [stride_b, 0, if tb { ldb } else { 1 }, if tb { 1 } else { ldb }];
    let sc = [m * n, n, 1, 0];
    let max_groups = gpu().limits.max_compute_workgroups_per_dimension as usize;
    let tiles = Tiling::new(&[batch, m, n, k])
        .tensor(&sc)
        .tensor(&sa)
        .tensor(&sb)
        .at_most(0, max_groups)
        .at_most(1, max_groups * 64)
        .at_most(2, max_groups * 64)
        .at_most(3, MAX_LOOP)
        .split()
        .unwrap_or_else(|e| too_large("matmul", [&out, a, b][e.tensor], &e, "one element"));
    let kernel = Kernel::new("matmul", "matmul").with("TA", ta as u8 as f64).with("TB", tb as u8 as f64);
    for t in tiles {
        let ((bc, c_off), (ba_, a_off), (bb_, b_off)) =
            (t.bind(&out, 0, &sc), t.bind(a, 0, &sa), t.bind(b, 0, &sb));
        let [tz, tm, tn, tk] = [t.len[0], t.len[1], t.len[2], t.len[3]];
        let p = Params::new().u(tm).u(tn).u(tk).u(stride_a).u(stride_b).u(m * n).u(lda).u(ldb).u(n);
        let p = p.u(a_off).u(b_off).u(c_off).u((t.start[3] > 0) as usize);
        gpu().dispatch(
            &kernel,
            p.bytes(),
            &[ba_, bb_, bc],
            [tn.div_ceil(64) as u32, tm.div_ceil(64) as u32, tz as u32],
        );
    }
    Tensor::with_op(out, Op::Matmul { a: a.clone(), b: b.clone(), ta, tb })
}

impl Tensor {
    /// Matrix product, batched over a leading axis.
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        matmul_t(self, other, false, false)
    }
}

/// CPU reference (f64 accumulation): [B, M, K] x [B, K, N] with transposes as above.
pub fn matmul_cpu(a: &[f32], b: &[f32], [batch, m, k, n]: [usize; 4], ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    for z in 0..batch {
        let (a, b) = (&a[z * m * k..], &b[z * k * n..]);
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|l| {
                        let av = if ta { a[l * m + i] } else { a[i * k + l] };
                        let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
                c[z * m * n + i * n + j] = s as f32;
            }
        }
    }
    c
}

//! Sorting on the GPU: the permutation that orders keys descending, ties by position (what a
//! stable descending sort gives).

use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, align_elems, binding_limit, range_binding};
use crate::tensor::{DType, Tensor};

/// Indices (U32, shape [len]) of the `len` largest keys, in descending key order, ties by
/// ascending position. Keys must be finite.
pub fn top_indices(keys: &Tensor, len: usize) -> Tensor {
    assert_eq!(keys.dtype(), DType::F32, "top_indices of a {:?} tensor", keys.dtype());
    let m = keys.numel();
    assert!(len <= m, "top_indices: {len} of {m} keys");
    let n = m.next_power_of_two().max(2);
    let k_buf = Tensor::empty(&[n]);
    let i_buf = Tensor::empty_u32(&[n]);
    let g = gpu();
    // Windows of w elements (a power of two) that fit one binding each.
    let w = 1usize << ((binding_limit() / 4).max(1).ilog2() as usize).min(n.ilog2() as usize);
    assert!(
        w == n || w >= align_elems(),
        "a storage binding limit of {} bytes holds no sort window",
        binding_limit()
    );
    let init = Kernel::new("sort", "init_pairs");
    for lo in (0..n).step_by(w) {
        let src = if lo < m { range_binding(keys, lo, w.min(m - lo)) } else { range_binding(keys, 0, 1) };
        let p = Params::new().u(w).u(m).u(0).u(lo).u(lo);
        g.dispatch_1d(
            &init,
            p.bytes(),
            &[src, range_binding(&k_buf, lo, w), range_binding(&i_buf, lo, w)],
            w as u64,
        );
    }
    let step = Kernel::new("sort", "bitonic_step");
    let launch = |j: usize, k: usize, lo: usize, hi: usize| {
        let b = [
            range_binding(&k_buf, lo, w),
            range_binding(&i_buf, lo, w),
            range_binding(&k_buf, hi, w),
            range_binding(&i_buf, hi, w),
        ];
        g.dispatch_1d(&step, Params::new().u(w).u(j).u(k).u(lo).u(hi).bytes(), &b, w as u64);
    };
    let mut k = 2;
    while k <= n {
        let mut j = k / 2;
        while j > 0 {
            if j < w {
                // Pairs lie within a window.
                for lo in (0..n).step_by(w) {
                    launch(j, k, lo, lo);
                }
            } else {
                // Pairs (i, i + j) for i in [base, base + j) of every block of 2j, a window at a time.
                for base in (0..n).step_by(2 * j) {
                    for lo in (base..base + j).step_by(w) {
                        launch(j, k, lo, lo + j);
                    }
                }
            }
            j /= 2;
        }
        k *= 2;
    }
    i_buf.with_shape_unchecked(&[len])
}

/// CPU reference: a stable sort by descending key.
pub fn top_indices_cpu(keys: &[f32], len: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_by(|&a, &b| keys[b as usize].partial_cmp(&keys[a as usize]).unwrap());
    order.truncate(len);
    order
}

//! Sorting on the GPU: the permutation that orders keys descending, ties by position (what a
//! stable descending sort gives), and the set of the largest keys without the sort.

use crate::gpu::{Kernel, gpu};
use crate::ops::scan::{nonzero_counted, prefix_count};
use crate::ops::{Params, align_elems, binding_limit, range_binding};
use crate::tensor::{DType, Tensor};

/// Indices (U32, shape `[len]`) of the `len` largest keys, in descending key order, ties by
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

/// Indices (U32, shape `[len]`) of the `len` largest keys, ties to the lower position (the first
/// `len` of [`top_indices`]), in increasing index order. A radix select: the `len`-th largest key
/// is found a byte at a time (four histogram passes over the keys), then the keys above it and
/// the first of those equal to it are compacted: about 20 launches that read the keys a few
/// times, where the bitonic sort of [`top_indices`] makes log2(n)^2 / 2 passes over them. No
/// readback. Keys must be finite. The flags it scans and compacts cover a power of two of
/// entries, at least `pad_to`: with `pad_to` at least the largest number of keys a caller passes,
/// every call makes the same launches and buffers of the same sizes (the scans' depth depends on
/// the length), so that a training step's requests do not change with the number of keys.
pub fn top_set(keys: &Tensor, len: usize, pad_to: usize) -> Tensor {
    assert_eq!(keys.dtype(), DType::F32, "top_set of a {:?} tensor", keys.dtype());
    let m = keys.numel();
    assert!(len <= m, "top_set: {len} of {m} keys");
    if len == 0 {
        return Tensor::empty_u32(&[0]);
    }
    let g = gpu();
    // The most elements one binding holds, a whole number of alignment units.
    let unit = (binding_limit() / 4) as usize / align_elems() * align_elems();
    assert!(unit > 0, "a storage binding limit of {} bytes holds no key window", binding_limit());
    let w = unit.min(m);
    let windows: Vec<(usize, usize)> = (0..m).step_by(w).map(|s| (s, w.min(m - s))).collect();
    let hist = Tensor::from_u32(&[0; 256], &[256]);
    let state = Tensor::from_u32(&[0, 0, len as u32], &[3]);
    // Keys a workgroup of the histogram counts (PER_LANE in the shader, times 256 lanes).
    const PER_GROUP: usize = 16 * 256;
    for shift in [24, 16, 8, 0] {
        for &(s, n) in &windows {
            g.dispatch(
                &Kernel::new("select", "histogram"),
                Params::new().u(n).u(shift).u(n).bytes(),
                &[range_binding(keys, s, n), hist.binding(), state.binding()],
                g.groups_1d(n.div_ceil(PER_GROUP) as u64, 1),
            );
        }
        g.dispatch(
            &Kernel::new("select", "pick"),
            Params::new().u(0).u(shift).u(0).bytes(),
            &[hist.binding(), state.binding()],
            [1, 1, 1],
        );
    }
    // Zero past the keys.
    let padded = m.max(pad_to).next_power_of_two();
    let fw = unit.min(padded);
    let flags = |entry: &'static str, tie_rank: Option<&Tensor>| {
        let out = Tensor::empty(&[padded]);
        for s in (0..padded).step_by(fw) {
            let n = fw.min(padded - s);
            let valid = m.saturating_sub(s).min(n);
            let k = if valid > 0 { range_binding(keys, s, valid) } else { range_binding(keys, 0, 1) };
            let mut b = vec![k, range_binding(&out, s, n), state.binding()];
            b.extend(tie_rank.map(|r| range_binding(r, s, n)));
            let p = Params::new().u(n).u(0).u(valid);
            g.dispatch_1d(&Kernel::new("select", entry), p.bytes(), &b, n as u64);
        }
        out
    };
    let tie_rank = prefix_count(&flags("ties", None));
    nonzero_counted(&flags("taken", Some(&tie_rank)), len)
}

/// CPU reference: a stable sort by descending key.
pub fn top_indices_cpu(keys: &[f32], len: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_by(|&a, &b| keys[b as usize].partial_cmp(&keys[a as usize]).unwrap());
    order.truncate(len);
    order
}

//! Sorting on the GPU: the permutation that orders keys descending, ties by position (what a
//! stable descending sort gives).

use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
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
    g.dispatch_1d(
        &Kernel::new("sort", "init_pairs"),
        Params::new().u(n).u(m).u(0).bytes(),
        &[keys.binding(), k_buf.binding(), i_buf.binding()],
        n as u64,
    );
    let step = Kernel::new("sort", "bitonic_step");
    let mut k = 2;
    while k <= n {
        let mut j = k / 2;
        while j > 0 {
            g.dispatch_1d(
                &step,
                Params::new().u(n).u(j).u(k).bytes(),
                &[k_buf.binding(), i_buf.binding()],
                n as u64,
            );
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

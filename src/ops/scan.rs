//! Stream compaction on the GPU: the indices of a mask's nonzero entries, in order.

use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
use crate::tensor::{DType, Tensor};

const BLOCK: usize = 1024;

/// Exclusive prefix sums of `x` (F32 read as nonzero flags, or U32 values).
fn exclusive_scan(x: &Tensor) -> Tensor {
    let n = x.numel();
    let blocks = n.div_ceil(BLOCK);
    let pos = Tensor::empty_u32(&[n]);
    let sums = Tensor::empty_u32(&[blocks]);
    let entry = if x.dtype() == DType::F32 { "scan_flags" } else { "scan_u32" };
    let g = gpu();
    let p = Params::new().u(n);
    g.dispatch(
        &Kernel::new("scan", entry),
        p.bytes(),
        &[x.binding(), pos.binding(), sums.binding()],
        g.groups_1d(blocks as u64, 1),
    );
    if blocks > 1 {
        let offsets = exclusive_scan(&sums);
        g.dispatch_1d(
            &Kernel::new("scan", "add_offsets"),
            p.bytes(),
            &[offsets.binding(), pos.binding()],
            n as u64,
        );
    }
    pos
}

/// Compaction without reading the count: the indices (valid up to the count) and the count.
fn compact(mask: &Tensor) -> (Tensor, Tensor) {
    assert_eq!(mask.dtype(), DType::F32, "nonzero of a {:?} tensor", mask.dtype());
    let n = mask.numel();
    let out = Tensor::empty_u32(&[n.max(1)]);
    let count = Tensor::empty_u32(&[1]);
    if n == 0 {
        gpu().upload(count.buffer(), 0, bytemuck::bytes_of(&0u32));
        return (out, count);
    }
    let pos = exclusive_scan(mask);
    gpu().dispatch_1d(
        &Kernel::new("scan", "compact"),
        Params::new().u(n).bytes(),
        &[mask.binding(), pos.binding(), out.binding(), count.binding()],
        n as u64,
    );
    (out, count)
}

/// The flat indices where each mask is nonzero, in increasing order (U32, shape [count]), with
/// one readback for all the counts.
pub fn nonzero_many(masks: &[&Tensor]) -> Vec<Tensor> {
    let parts: Vec<(Tensor, Tensor)> = masks.iter().map(|m| compact(m)).collect();
    let counts = Tensor::empty_u32(&[parts.len().max(1)]);
    for (i, (_, c)) in parts.iter().enumerate() {
        gpu().copy(c.buffer(), 0, counts.buffer(), 4 * i as u64, 4);
    }
    let counts = counts.to_u32();
    parts.into_iter().zip(counts).map(|((idx, _), c)| idx.with_shape_unchecked(&[c as usize])).collect()
}

/// For every entry of `mask`, how many nonzero entries precede it (U32, shape [n]): an entry's
/// position among the indices [`nonzero`] returns. No readback.
pub fn prefix_count(mask: &Tensor) -> Tensor {
    assert_eq!(mask.dtype(), DType::F32, "prefix_count of a {:?} tensor", mask.dtype());
    if mask.numel() == 0 {
        return Tensor::empty_u32(&[0]);
    }
    exclusive_scan(mask)
}

/// The flat indices where `mask` is nonzero, in increasing order (U32, shape [count]). Reads the
/// count back to the host.
pub fn nonzero(mask: &Tensor) -> Tensor {
    nonzero_many(&[mask]).pop().expect("one mask, one result")
}

impl Tensor {
    /// Rows of `self` (entries of axis 0) where `mask` (one value per row) is nonzero.
    pub fn select_rows(&self, mask: &Tensor) -> Tensor {
        assert_eq!(
            mask.numel(),
            self.dim(0),
            "select_rows: {} mask entries for {} rows",
            mask.numel(),
            self.dim(0)
        );
        self.gather_rows(&nonzero(mask))
    }
}

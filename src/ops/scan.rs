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

/// The flat indices where `mask` is nonzero, in increasing order (U32, shape [count]). Reads the
/// count back to the host.
pub fn nonzero(mask: &Tensor) -> Tensor {
    assert_eq!(mask.dtype(), DType::F32, "nonzero of a {:?} tensor", mask.dtype());
    let n = mask.numel();
    if n == 0 {
        return Tensor::empty_u32(&[0]);
    }
    let pos = exclusive_scan(mask);
    let out = Tensor::empty_u32(&[n]);
    let count = Tensor::empty_u32(&[1]);
    gpu().dispatch_1d(
        &Kernel::new("scan", "compact"),
        Params::new().u(n).bytes(),
        &[mask.binding(), pos.binding(), out.binding(), count.binding()],
        n as u64,
    );
    let count = count.to_u32()[0] as usize;
    out.with_shape_unchecked(&[count])
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

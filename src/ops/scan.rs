//! Stream compaction on the GPU: the indices of a mask's nonzero entries, in order.

use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, align_elems, binding_limit, range_binding};
use crate::tensor::{DType, Tensor};

/// Values per invocation of the scan kernels: 16, or 4 where a binding cannot hold an aligned
/// run of such blocks (limits far below any real adapter's).
fn per() -> usize {
    if binding_limit() as usize / 4 >= 256 * 16 * align_elems() { 16 } else { 4 }
}

/// Entries per workgroup of the scan kernels (256 invocations x [`per`]).
fn block(per: usize) -> usize {
    256 * per
}

fn scan_kernel(entry: &'static str, per: usize) -> Kernel {
    Kernel::new("scan", entry).with("PER", per as f64)
}

/// Runs [start, start + len) of `n` elements that fit one binding, each a whole number of blocks
/// whose block-total offset is aligned too.
fn chunks(n: usize, block: usize) -> Vec<(usize, usize)> {
    let unit = block * align_elems();
    let chunk = (binding_limit() as usize / 4) / unit * unit;
    assert!(chunk > 0, "a storage binding limit of {} bytes holds no scan block", binding_limit());
    (0..n).step_by(chunk).map(|s| (s, chunk.min(n - s))).collect()
}

/// Exclusive prefix sums of `x` (F32 read as nonzero flags, or U32 values).
fn exclusive_scan(x: &Tensor) -> Tensor {
    let n = x.numel();
    let per = per();
    let block = block(per);
    let blocks = n.div_ceil(block);
    let pos = Tensor::empty_u32(&[n]);
    let sums = Tensor::empty_u32(&[blocks]);
    let entry = if x.dtype() == DType::F32 { "scan_flags" } else { "scan_u32" };
    let g = gpu();
    let runs = chunks(n, block);
    for &(s, len) in &runs {
        let nb = len.div_ceil(block);
        g.dispatch(
            &scan_kernel(entry, per),
            Params::new().u(len).bytes(),
            &[range_binding(x, s, len), range_binding(&pos, s, len), range_binding(&sums, s / block, nb)],
            g.groups_1d(nb as u64, 1),
        );
    }
    if blocks > 1 {
        let offsets = exclusive_scan(&sums);
        for &(s, len) in &runs {
            g.dispatch_1d(
                &scan_kernel("add_offsets", per),
                Params::new().u(len).bytes(),
                &[range_binding(&offsets, s / block, len.div_ceil(block)), range_binding(&pos, s, len)],
                len as u64,
            );
        }
    }
    pos
}

/// Compaction without reading the count: the indices (valid up to the count) and the count.
fn compact(mask: &Tensor) -> (Tensor, Tensor, Tensor) {
    assert_eq!(mask.dtype(), DType::F32, "nonzero of a {:?} tensor", mask.dtype());
    let n = mask.numel();
    let out = Tensor::empty_u32(&[n.max(1)]);
    let count = Tensor::empty_u32(&[1]);
    if n == 0 {
        gpu().upload(count.buffer(), 0, bytemuck::bytes_of(&0u32));
        return (out, count, Tensor::empty_u32(&[0]));
    }
    let pos = exclusive_scan(mask);
    let runs = chunks(n, block(per()));
    // Entries of a run land at or before their own index: output windows past the run are idle.
    let wlen = runs[0].1;
    for (ri, &(s, len)) in runs.iter().enumerate() {
        for w0 in (0..s + len).step_by(wlen) {
            let last = ri + 1 == runs.len() && w0 == 0;
            let wl = wlen.min(n - w0);
            let p = Params::new().u(len).u(s).u(w0).u(wl).u(last as usize);
            gpu().dispatch_1d(
                &Kernel::new("scan", "compact"),
                p.bytes(),
                &[
                    range_binding(mask, s, len),
                    range_binding(&pos, s, len),
                    range_binding(&out, w0, wl),
                    count.binding(),
                ],
                len as u64,
            );
        }
    }
    (out, count, pos)
}

/// The flat indices where each mask is nonzero, in increasing order (U32, shape `[count]`), with
/// one readback for all the counts.
pub fn nonzero_many(masks: &[&Tensor]) -> Vec<Tensor> {
    nonzero_many_with(masks, None).indices
}

/// What [`nonzero_many_with`] finds.
pub struct Compacted {
    /// Per mask, the flat indices of its nonzero entries (U32, shape `[count]`).
    pub indices: Vec<Tensor>,
    /// Per mask, its [`prefix_count`] (computed on the way, no extra work).
    pub prefix_counts: Vec<Tensor>,
    /// The values of `extra`, read back with the counts.
    pub values: Vec<f32>,
}

/// [`nonzero_many`], also reading the values of `extra` (F32) back in the same readback. In a
/// rehearsal ([`crate::gpu::Gpu::rehearse`]) nothing is read: every mask counts as all nonzero.
pub fn nonzero_many_with(masks: &[&Tensor], extra: Option<&Tensor>) -> Compacted {
    let parts: Vec<(Tensor, Tensor, Tensor)> = masks.iter().map(|m| compact(m)).collect();
    let extra_len = extra.map_or(0, |e| e.numel());
    let words = Tensor::empty_u32(&[(parts.len() + extra_len).max(1)]);
    for (i, (_, c, _)) in parts.iter().enumerate() {
        gpu().copy(c.buffer(), 0, words.buffer(), 4 * i as u64, 4);
    }
    if let Some(e) = extra {
        assert_eq!(e.dtype(), DType::F32, "values read with the counts must be F32");
        gpu().copy(e.buffer(), 0, words.buffer(), 4 * parts.len() as u64, e.bytes());
    }
    if crate::gpu::rehearsing() {
        // Nothing to read: every entry counts as nonzero (each selection at its largest), the
        // values as zeros.
        let (mut indices, mut prefix_counts) = (Vec::new(), Vec::new());
        for ((idx, _, pos), m) in parts.into_iter().zip(masks) {
            indices.push(idx.with_shape_unchecked(&[m.numel()]));
            prefix_counts.push(pos);
        }
        return Compacted { indices, prefix_counts, values: vec![0.0; extra_len] };
    }
    let words = words.to_u32();
    let values = words[parts.len()..parts.len() + extra_len].iter().map(|&w| f32::from_bits(w)).collect();
    let (mut indices, mut prefix_counts) = (Vec::new(), Vec::new());
    for ((idx, _, pos), c) in parts.into_iter().zip(words) {
        indices.push(idx.with_shape_unchecked(&[c as usize]));
        prefix_counts.push(pos);
    }
    Compacted { indices, prefix_counts, values }
}

/// For every entry of `mask`, how many nonzero entries precede it (U32, shape `[n]`): an entry's
/// position among the indices [`nonzero`] returns. No readback.
pub fn prefix_count(mask: &Tensor) -> Tensor {
    assert_eq!(mask.dtype(), DType::F32, "prefix_count of a {:?} tensor", mask.dtype());
    if mask.numel() == 0 {
        return Tensor::empty_u32(&[0]);
    }
    exclusive_scan(mask)
}

/// The flat indices where `mask` is nonzero, in increasing order, when the caller knows that
/// there are `count` of them (U32, shape `[count]`). No readback.
pub fn nonzero_counted(mask: &Tensor, count: usize) -> Tensor {
    assert!(count <= mask.numel(), "{count} nonzero entries of {} ", mask.numel());
    compact(mask).0.with_shape_unchecked(&[count])
}

/// The flat indices where `mask` is nonzero, in increasing order (U32, shape `[count]`). Reads the
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

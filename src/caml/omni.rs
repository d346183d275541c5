//! The omni-correlation consistency on the unlabeled side (SPEC section 2, item 4).

use crate::caml::losses::{omni_correlation, omni_correlation_loss};
use crate::ops::sort;
use crate::tensor::Tensor;

/// The rows that enter the omni-correlation: per class (0 then 1), at most `num_filtered` of
/// the voxels `class_voxels[c]` (U32 flat indices, increasing), the most confident first (ties by
/// voxel order), given as their positions among the consistent voxels (`rank`, the
/// [`crate::ops::scan::prefix_count`] of the consistent mask). `confidence` holds every voxel's.
pub fn select_rows(
    rank: &Tensor,
    class_voxels: [&Tensor; 2],
    confidence: &Tensor,
    num_filtered: usize,
) -> [Tensor; 2] {
    let n = confidence.numel();
    class_voxels.map(|idx| {
        let kept = if idx.numel() <= num_filtered {
            idx.clone()
        } else {
            let conf = confidence.reshape(&[n, 1]).gather_rows(idx).reshape(&[idx.numel()]);
            idx.gather_rows(&sort::top_indices(&conf, num_filtered))
        };
        rank.gather_rows(&kept)
    })
}

/// loss_o for features of both networks ([rows, E], the same rows), the rows chosen per class by
/// [`select_rows`], and the sampled memory per class. `None` when either matrix is empty.
pub fn omni_loss(
    feats_v: &Tensor,
    feats_a: &Tensor,
    rows: &[Tensor; 2],
    memory: &[Option<Tensor>; 2],
    temperature: f32,
) -> Option<Tensor> {
    let (mut corr_v, mut corr_a) = (Vec::new(), Vec::new());
    for idx in rows {
        let present: Vec<&Tensor> =
            memory.iter().flatten().filter(|m| idx.numel() > 1 && m.dim(0) > 1).collect();
        if present.is_empty() {
            continue;
        }
        corr_v.push(omni_correlation(&feats_v.gather_rows(idx), &present, temperature));
        corr_a.push(omni_correlation(&feats_a.gather_rows(idx), &present, temperature));
    }
    if corr_v.is_empty() {
        return None;
    }
    let stack =
        |v: Vec<Tensor>| if v.len() == 1 { v.into_iter().next().unwrap() } else { Tensor::concat(&v, 0) };
    Some(omni_correlation_loss(&stack(corr_v), &stack(corr_a)))
}

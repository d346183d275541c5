//! The omni-correlation consistency on the unlabeled side (SPEC section 2, item 4).

use crate::ops::sort;
use crate::tensor::Tensor;

/// The rows that enter the omni-correlation: per class (0 then 1), at most `num_filtered` of
/// the voxels `class_voxels[c]` (U32 flat indices, increasing), the most confident (ties by
/// voxel order), given as their positions among the consistent voxels (`rank`, the
/// [`crate::ops::scan::prefix_count`] of the consistent mask), in voxel order: the reference's
/// sort by confidence keeps the same rows, and the loss is a sum over rows. `confidence` holds
/// every voxel's.
pub fn select_rows(
    rank: &Tensor,
    class_voxels: [&Tensor; 2],
    confidence: &Tensor,
    num_filtered: usize,
) -> [Tensor; 2] {
    let n = confidence.numel();
    class_voxels.map(|idx| {
        // Also when every voxel is kept, with the flags padded to every unlabeled voxel, and for a
        // class without voxels (on one key, voxel 0's, made for every class; nothing of it kept):
        // the step then makes the same requests whichever side of the cap a class is on and
        // however many voxels it has, so that its buffers follow one plan.
        let first_voxel = Tensor::from_u32(&[0], &[1]);
        let keys_at = if idx.numel() == 0 { first_voxel.clone() } else { idx.clone() };
        let conf = confidence.reshape(&[n, 1]).gather_rows(&keys_at).reshape(&[keys_at.numel()]);
        let kept = keys_at.gather_rows(&sort::top_set(&conf, keys_at.numel().min(num_filtered), n));
        rank.gather_rows(if idx.numel() == 0 { idx } else { &kept })
    })
}

/// loss_o for features of both networks ([rows, E], the same rows), the rows chosen per class by
/// [`select_rows`], and the sampled memory per class. `None` when either matrix is empty.
///
/// The rows of every class meet the same memory (the classes present, joined along columns), so
/// the per-class correlation matrices stacked by rows are one product of the stacked rows with
/// the joined memory, and the loss is one fused cross-entropy that keeps only the two logit
/// matrices for the backward ([`crate::ops::reduce::softmax_xent`]).
pub fn omni_loss(
    feats_v: Tensor,
    feats_a: Tensor,
    rows: &[Tensor; 2],
    memory: &[Option<Tensor>; 2],
    temperature: f32,
) -> Option<Tensor> {
    let max_rows = rows.iter().map(Tensor::numel).sum();
    omni_loss_at(
        [&|idx| feats_v.gather_rows(idx), &|idx| feats_a.gather_rows(idx)],
        rows,
        memory,
        temperature,
        max_rows,
    )
}

/// [`omni_loss`] with the features given at the kept rows: `feats[0](index)` are both
/// networks' features [K, E] at the rows `index` (the kept rows of every class, joined). The
/// heads compute them at those rows only ([`crate::caml::model::Head::pair_rows_at`]), a few
/// thousand of the hundreds of thousands of consistent voxels. `max_rows` bounds the kept rows
/// of every step (2 `num_filtered`): the loss's reductions then keep one shape of launches.
pub fn omni_loss_at(
    feats: [&dyn Fn(&Tensor) -> Tensor; 2],
    rows: &[Tensor; 2],
    memory: &[Option<Tensor>; 2],
    temperature: f32,
    max_rows: usize,
) -> Option<Tensor> {
    let present: Vec<Tensor> = memory.iter().flatten().filter(|m| m.dim(0) > 1).cloned().collect();
    let kept: Vec<&Tensor> = rows.iter().filter(|idx| idx.numel() > 1).collect();
    if present.is_empty() || kept.is_empty() {
        return None;
    }
    // Joined also when there is one of each (a small copy): the step's requests do not depend on
    // which classes are present.
    let memory = Tensor::concat(&present, 0);
    let index = Tensor::concat_u32(&kept);
    let logits = |f: &Tensor| crate::ops::matmul::matmul_t(f, &memory, false, true);
    Some(crate::ops::reduce::softmax_xent(
        &logits(&feats[0](&index)),
        &logits(&feats[1](&index)),
        temperature,
        1e-8,
        max_rows,
    ))
}

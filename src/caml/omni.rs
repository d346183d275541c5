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
        // Also when every voxel is kept, and with the flags padded to every unlabeled voxel: the
        // step then makes the same requests whichever side of the cap a class is on and however
        // many voxels it has (its buffers follow one plan).
        let kept = if idx.numel() == 0 {
            idx.clone()
        } else {
            let conf = confidence.reshape(&[n, 1]).gather_rows(idx).reshape(&[idx.numel()]);
            idx.gather_rows(&sort::top_set(&conf, idx.numel().min(num_filtered), n))
        };
        rank.gather_rows(&kept)
    })
}

/// loss_o for features of both networks ([rows, E], the same rows), the rows chosen per class by
/// [`select_rows`], and the sampled memory per class. `None` when either matrix is empty.
///
/// The rows of every class meet the same memory (the classes present, joined along columns), so
/// the per-class correlation matrices stacked by rows are one product of the stacked rows with
/// the joined memory, and the loss is one fused cross-entropy that keeps only the two logit
/// matrices for the backward ([`crate::ops::reduce::softmax_xent`]).
///
/// The features are taken by value and dropped once their rows are gathered: only the gathered
/// rows are needed from here on, and the full [rows, E] matrices are the largest tensors alive.
pub fn omni_loss(
    feats_v: Tensor,
    feats_a: Tensor,
    rows: &[Tensor; 2],
    memory: &[Option<Tensor>; 2],
    temperature: f32,
) -> Option<Tensor> {
    omni_loss_after(feats_v, feats_a, [&|t| t.clone(), &|t| t.clone()], rows, memory, temperature)
}

/// [`omni_loss`] for the features `last[0](hidden_v)` and `last[1](hidden_a)`, where `last` is a
/// row-wise map (the prediction heads' final linear layer): it is applied to the kept rows
/// only, a few thousand of the hundreds of thousands of consistent voxels, which spares the
/// layer's passes over every row forward and backward.
pub fn omni_loss_after(
    hidden_v: Tensor,
    hidden_a: Tensor,
    last: [&dyn Fn(&Tensor) -> Tensor; 2],
    rows: &[Tensor; 2],
    memory: &[Option<Tensor>; 2],
    temperature: f32,
) -> Option<Tensor> {
    let present: Vec<Tensor> = memory.iter().flatten().filter(|m| m.dim(0) > 1).cloned().collect();
    let kept: Vec<&Tensor> = rows.iter().filter(|idx| idx.numel() > 1).collect();
    if present.is_empty() || kept.is_empty() {
        return None;
    }
    let join = |v: Vec<Tensor>, axis| {
        if v.len() == 1 { v.into_iter().next().unwrap() } else { Tensor::concat(&v, axis) }
    };
    let memory = join(present, 0);
    let gather = |feats: Tensor| join(kept.iter().map(|idx| feats.gather_rows(idx)).collect(), 0);
    let (fv, fa) = (last[0](&gather(hidden_v)), last[1](&gather(hidden_a)));
    let logits = |f: &Tensor| crate::ops::matmul::matmul_t(f, &memory, false, true);
    Some(crate::ops::reduce::softmax_xent(&logits(&fv), &logits(&fa), temperature, 1e-8))
}

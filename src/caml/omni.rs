//! The omni-correlation consistency on the unlabeled side (SPEC section 2, item 4).

use crate::caml::losses::{omni_correlation, omni_correlation_loss};
use crate::ops::{scan, sort};
use crate::tensor::Tensor;

/// The rows that enter the omni-correlation: per class (0 then 1) the row indices (U32) of that
/// class, at most `num_filtered` of them, the most confident first (ties by row order).
pub fn select_rows(class: &Tensor, confidence: &Tensor, num_filtered: usize) -> [Tensor; 2] {
    let masks = [class.eq(&Tensor::scalar(0.0)), class.eq(&Tensor::scalar(1.0))];
    let found = scan::nonzero_many(&[&masks[0], &masks[1]]);
    let mut out = found.into_iter().map(|idx| {
        if idx.numel() <= num_filtered {
            return idx;
        }
        let conf = confidence.gather_rows(&idx);
        idx.gather_rows(&sort::top_indices(&conf, num_filtered))
    });
    [out.next().unwrap(), out.next().unwrap()]
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

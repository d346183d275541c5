//! The three CAML losses and the consistency ramp (SPEC section 2, items 1, 2, 4, 5).

use crate::tensor::Tensor;

/// Smoothing of the dice ratio, as in the reference.
const DICE_EPS: f32 = 1e-8;

/// dice(p) = 1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps), sums over every element.
/// `p`: foreground probabilities; `g`: the foreground mask (0/1), same shape.
pub fn dice_loss(p: &Tensor, g: &Tensor) -> Tensor {
    let inter = p.mul(g).sum_all();
    let denom = p.sum_all().add(&g.sum_all()).add_scalar(DICE_EPS);
    inter.affine(2.0, DICE_EPS).div(&denom).affine(-1.0, 1.0)
}

/// P^(1/T) / (P^(1/T) + (1 - P)^(1/T)), elementwise.
pub fn sharpen(p: &Tensor, temperature: f32) -> Tensor {
    let e = 1.0 / temperature;
    let a = p.powf(e);
    let b = p.affine(-1.0, 1.0).powf(e);
    a.div(&a.add(&b))
}

/// Mean squared error over every element.
pub fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    let d = a.sub(b);
    d.mul(&d).mean_all()
}

/// loss_c = mse(P_v, sharpen(P_a)) + mse(P_a, sharpen(P_v)). The reference does not detach the
/// sharpened targets, so gradients flow through both sides unless `detach_targets`. One fused
/// pass each way ([`crate::ops::consistency`]).
pub fn consistency_loss(p_v: &Tensor, p_a: &Tensor, temperature: f32, detach_targets: bool) -> Tensor {
    crate::ops::consistency::consistency_loss(p_v, p_a, temperature, detach_targets)
}

/// [`consistency_loss`] composed of elementwise ops, as the reference writes it.
pub fn consistency_loss_composed(
    p_v: &Tensor,
    p_a: &Tensor,
    temperature: f32,
    detach_targets: bool,
) -> Tensor {
    let (mut t_a, mut t_v) = (sharpen(p_a, temperature), sharpen(p_v, temperature));
    if detach_targets {
        (t_a, t_v) = (t_a.detach(), t_v.detach());
    }
    mse(p_v, &t_a).add(&mse(p_a, &t_v))
}

/// The omni-correlation matrix: `feats @ memory_m^T` for each memory class m ([rows, E] x
/// [cols_m, E]), joined along columns, then a row-wise softmax of the logits / temperature.
pub fn omni_correlation(feats: &Tensor, memories: &[&Tensor], temperature: f32) -> Tensor {
    let logits: Vec<Tensor> =
        memories.iter().map(|m| crate::ops::matmul::matmul_t(feats, m, false, true)).collect();
    let logits = if logits.len() == 1 { logits[0].clone() } else { Tensor::concat(&logits, 1) };
    logits.mul_scalar(1.0 / temperature).softmax(1)
}

/// loss_o = sum(-corr_a * log(corr_v + 1e-8)) / rows; gradients flow into both matrices.
pub fn omni_correlation_loss(corr_v: &Tensor, corr_a: &Tensor) -> Tensor {
    let rows = corr_v.dim(0) as f32;
    corr_a.mul(&corr_v.add_scalar(1e-8).log()).sum_all().mul_scalar(-1.0 / rows)
}

/// The sigmoid-shaped ramp exp(-5 (1 - min(t, R) / R)^2); 1 when R is 0.
pub fn sigmoid_rampup(t: f64, length: f64) -> f64 {
    if length == 0.0 {
        return 1.0;
    }
    let phase = 1.0 - t.clamp(0.0, length) / length;
    (-5.0 * phase * phase).exp()
}

/// The loss weights of one iteration (counted from 1): lambda_c = c * ramp(iter // every) and
/// lambda_o = o * ramp(iter // every).
#[derive(Clone, Copy, Debug)]
pub struct Ramp {
    pub consistency: f64,
    pub omni: f64,
    /// Ramp length R, in steps of `every` iterations.
    pub length: f64,
    pub every: u64,
}

impl Ramp {
    /// R = 40, 20 or 15 for 4, 8 or 16 labeled cases, as the released runs used.
    pub fn paper(labeled: usize) -> Ramp {
        let length = match labeled {
            0..=4 => 40.0,
            5..=8 => 20.0,
            _ => 15.0,
        };
        Ramp { consistency: 1.0, omni: 0.05, length, every: 150 }
    }
    pub fn weights(&self, iter: u64) -> (f64, f64) {
        let r = sigmoid_rampup((iter / self.every) as f64, self.length);
        (self.consistency * r, self.omni * r)
    }
}

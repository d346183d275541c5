//! CMA, Cross-sample Mutual Attention (SPEC section 1): after encoder stage 4 of the auxiliary
//! network, an intra-sample transformer layer (tokens = the voxels of one sample) then an
//! inter-sample one (tokens = the samples of the batch at one voxel position). Training mode
//! only; in eval mode the features pass through unchanged.
//!
//! The reference feeds PyTorch's sequence-first `TransformerEncoderLayer` with
//! `x.permute(0, 2, 3, 4, 1).view(N, XYZ, C).permute(1, 0, 2)` ([XYZ, N, C]: sequences of voxels,
//! one per sample) for the intra layer and `[N, XYZ, C]` (sequences of samples, one per voxel) for
//! the inter layer. Here the same sequences are laid out [sequences, tokens, C].

use crate::nn::transformer::{TransformerEncoderLayer, derive_seed};
use crate::rng::Rng;
use crate::tensor::Tensor;

pub struct Cma {
    pub intra_attention: TransformerEncoderLayer,
    pub inter_attention: TransformerEncoderLayer,
}

impl Cma {
    /// The reference: `Cma::new(128, 4, 512, 0.5, seed)`.
    pub fn new(channels: usize, heads: usize, dim_feedforward: usize, dropout: f32, seed: u64) -> Cma {
        let mut rng = Rng::new(seed);
        Cma {
            intra_attention: TransformerEncoderLayer::new(
                channels,
                heads,
                dim_feedforward,
                dropout,
                &mut rng,
            ),
            inter_attention: TransformerEncoderLayer::new(
                channels,
                heads,
                dim_feedforward,
                dropout,
                &mut rng,
            ),
        }
    }

    /// x [N, C, X, Y, Z] -> [N, C, X, Y, Z]. `train` Some(seed): both layers with dropout masks
    /// derived from the seed; None (eval mode): x itself.
    pub fn forward(&self, x: &Tensor, train: Option<u64>) -> Tensor {
        let Some(seed) = train else { return x.clone() };
        let &[n, c, ..] = x.shape() else { panic!("CMA input {:?}: [N, C, X, Y, Z] expected", x.shape()) };
        let voxels = x.numel() / (n * c);
        // [N, XYZ, C]: one sequence of voxels per sample.
        let t = x.reshape(&[n, c, voxels]).permute(&[0, 2, 1]);
        let t = self.intra_attention.forward(&t, Some(derive_seed(seed, 0)));
        // [XYZ, N, C]: one sequence of samples per voxel.
        let t = self.inter_attention.forward(&t.permute(&[1, 0, 2]), Some(derive_seed(seed, 1)));
        t.permute(&[1, 2, 0]).reshape(x.shape())
    }

    /// (name, tensor) pairs, e.g. `{prefix}intra_attention.encoder_layers.self_attn.in_proj_weight`
    /// with prefix "encoder2.".
    pub fn params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut p = self.intra_attention.params(&format!("{prefix}intra_attention.encoder_layers."));
        p.extend(self.inter_attention.params(&format!("{prefix}inter_attention.encoder_layers.")));
        p
    }
}

/// CPU reference of the arrangement without dropout (f64 arithmetic), for the tests.
pub mod cpu {
    use crate::nn::transformer::cpu::{LayerParams, encoder_layer};

    /// x [n, c, voxels] -> [n, c, voxels].
    pub fn cma(
        x: &[f32],
        [n, c, v]: [usize; 3],
        heads: usize,
        intra: &LayerParams,
        inter: &LayerParams,
    ) -> Vec<f32> {
        // Intra: sequence s = sample, token t = voxel.
        let mut seq = vec![0f32; n * v * c];
        for s in 0..n {
            for t in 0..v {
                for ch in 0..c {
                    seq[(s * v + t) * c + ch] = x[(s * c + ch) * v + t];
                }
            }
        }
        let y = encoder_layer(&seq, [n, v, c], heads, intra);
        // Inter: sequence s = voxel, token t = sample.
        let mut seq = vec![0f32; v * n * c];
        for s in 0..v {
            for t in 0..n {
                for ch in 0..c {
                    seq[(s * n + t) * c + ch] = y[(t * v + s) * c + ch];
                }
            }
        }
        let z = encoder_layer(&seq, [v, n, c], heads, inter);
        let mut out = vec![0f32; n * c * v];
        for s in 0..n {
            for ch in 0..c {
                for t in 0..v {
                    out[(s * c + ch) * v + t] = z[(t * n + s) * c + ch];
                }
            }
        }
        out
    }
}

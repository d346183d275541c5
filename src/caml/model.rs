//! The CAML network (`caml3d_v1`, SPEC section 1): two VNet encoder/decoder pairs, the auxiliary
//! encoder with CMA after stage 4, decoder 1 upsampling by transposed convolution and decoder 2 by
//! trilinear interpolation, and the projection/prediction heads. Names follow PyTorch's state_dict.
//!
//! `train: Option<u64>`: Some(seed) is training mode (batch statistics, dropout with masks derived
//! from the seed), None is eval mode.

use crate::autograd::no_grad;
use crate::caml::cma::Cma;
use crate::nn::{BatchNorm, Conv3d, ConvTranspose3d, Linear, Named, join};
use crate::ops::dropout::dropout3d;
use crate::ops::linear::{linear, linear_relu_selected, linear_selected};
use crate::ops::matmul::matmul_t;
use crate::ops::moments::gram_rows_at;
use crate::ops::upsample::upsample_trilinear2x;
use crate::rng::Rng;
use crate::rng::derive_seed;
use crate::tensor::Tensor;

/// `ConvBlock(n, cin, cout)`: n stages of [Conv3d k3 p1, BatchNorm3d, ReLU] at `conv.{3i}` and
/// `conv.{3i+1}`.
pub struct ConvBlock {
    stages: Vec<(Conv3d, BatchNorm)>,
}

impl ConvBlock {
    fn new(n: usize, cin: usize, cout: usize, rng: &mut Rng) -> Self {
        let stages = (0..n)
            .map(|i| (Conv3d::new(if i == 0 { cin } else { cout }, cout, 3, 1, 1, rng), BatchNorm::new(cout)))
            .collect();
        ConvBlock { stages }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.stages
            .iter()
            .fold(x.clone(), |h, (c, bn)| bn.forward_relu(&c.forward_before_batchnorm(&h, train), train))
    }
    fn named(&self, prefix: &str, params: &mut Named, buffers: &mut Named) {
        for (i, (c, bn)) in self.stages.iter().enumerate() {
            c.params(&join(prefix, &format!("conv.{}", 3 * i)), params);
            bn.params(&join(prefix, &format!("conv.{}", 3 * i + 1)), params);
            bn.buffers(&join(prefix, &format!("conv.{}", 3 * i + 1)), buffers);
        }
    }
}

/// [conv, BatchNorm3d, ReLU] with the conv at `conv.{at}` and the norm after it: `Down` (k2 s2,
/// at 0), `UpDeconv` (transposed k2 s2, at 0), `UpLinear` (trilinear x2 then k3 p1, at 1).
pub enum Stage {
    Down(Conv3d, BatchNorm),
    UpDeconv(ConvTranspose3d, BatchNorm),
    UpLinear(Conv3d, BatchNorm),
}

impl Stage {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Stage::Down(c, bn) => bn.forward_relu(&c.forward_before_batchnorm(x, train), train),
            Stage::UpDeconv(c, bn) => bn.forward_relu(&c.forward_before_batchnorm(x, train), train),
            Stage::UpLinear(c, bn) => {
                bn.forward_relu(&c.forward_before_batchnorm(&upsample_trilinear2x(x), train), train)
            }
        }
    }
    fn named(&self, prefix: &str, params: &mut Named, buffers: &mut Named) {
        let (conv_at, bn) = match self {
            Stage::Down(c, bn) => {
                c.params(&join(prefix, "conv.0"), params);
                (0, bn)
            }
            Stage::UpDeconv(c, bn) => {
                c.params(&join(prefix, "conv.0"), params);
                (0, bn)
            }
            Stage::UpLinear(c, bn) => {
                c.params(&join(prefix, "conv.1"), params);
                (1, bn)
            }
        };
        let at = join(prefix, &format!("conv.{}", conv_at + 1));
        bn.params(&at, params);
        bn.buffers(&at, buffers);
    }
}

/// Dropout3d(p) in training mode, with a mask derived from the iteration's seed and the site.
fn dropout(x: &Tensor, p: f32, train: Option<u64>, site: u64) -> Tensor {
    match train {
        Some(seed) if p > 0.0 => dropout3d(x, p, derive_seed(seed, site), true),
        _ => x.clone(),
    }
}

pub struct Encoder {
    block_one: ConvBlock,
    block_one_dw: Stage,
    block_two: ConvBlock,
    block_two_dw: Stage,
    block_three: ConvBlock,
    block_three_dw: Stage,
    block_four: ConvBlock,
    block_four_dw: Stage,
    block_five: ConvBlock,
    /// The auxiliary encoder's cross-sample mutual attention on x4 (d = 8F, 4 heads, 32F wide
    /// feed-forward, dropout 0.5).
    pub cma: Option<Cma>,
}

/// The encoder's skip features x1..x4 and its output x5.
pub struct Features {
    pub skips: [Tensor; 4],
    pub x5: Tensor,
}

impl Encoder {
    fn new(f: usize, cma: bool, rng: &mut Rng) -> Self {
        let down = |cin, cout, rng: &mut Rng| {
            Stage::Down(Conv3d::new(cin, cout, 2, 2, 0, rng), BatchNorm::new(cout))
        };
        Encoder {
            block_one: ConvBlock::new(1, 1, f, rng),
            block_one_dw: down(f, 2 * f, rng),
            block_two: ConvBlock::new(2, 2 * f, 2 * f, rng),
            block_two_dw: down(2 * f, 4 * f, rng),
            block_three: ConvBlock::new(3, 4 * f, 4 * f, rng),
            block_three_dw: down(4 * f, 8 * f, rng),
            block_four: ConvBlock::new(3, 8 * f, 8 * f, rng),
            block_four_dw: down(8 * f, 16 * f, rng),
            block_five: ConvBlock::new(3, 16 * f, 16 * f, rng),
            cma: cma.then(|| Cma::new(8 * f, 4, 32 * f, 0.5, rng.next_u64())),
        }
    }

    fn forward(&self, x: &Tensor, train: Option<u64>, p: f32) -> Features {
        let t = train.is_some();
        let x1 = self.block_one.forward(x, t);
        let x2 = self.block_two.forward(&self.block_one_dw.forward(&x1, t), t);
        let x3 = self.block_three.forward(&self.block_two_dw.forward(&x2, t), t);
        let mut x4 = self.block_four.forward(&self.block_three_dw.forward(&x3, t), t);
        if let Some(cma) = &self.cma {
            x4 = cma.forward(&x4, train.map(|s| derive_seed(s, 10)));
        }
        let x5 = self.block_five.forward(&self.block_four_dw.forward(&x4, t), t);
        let x5 = dropout(&x5, p, train, 11);
        Features { skips: [x1, x2, x3, x4], x5 }
    }

    fn named(&self, prefix: &str, params: &mut Named, buffers: &mut Named) {
        self.block_one.named(&join(prefix, "block_one"), params, buffers);
        self.block_one_dw.named(&join(prefix, "block_one_dw"), params, buffers);
        self.block_two.named(&join(prefix, "block_two"), params, buffers);
        self.block_two_dw.named(&join(prefix, "block_two_dw"), params, buffers);
        self.block_three.named(&join(prefix, "block_three"), params, buffers);
        self.block_three_dw.named(&join(prefix, "block_three_dw"), params, buffers);
        self.block_four.named(&join(prefix, "block_four"), params, buffers);
        self.block_four_dw.named(&join(prefix, "block_four_dw"), params, buffers);
        self.block_five.named(&join(prefix, "block_five"), params, buffers);
        if let Some(cma) = &self.cma {
            params.extend(cma.params(&format!("{prefix}.")));
        }
    }
}

pub struct Decoder {
    block_five_up: Stage,
    block_six: ConvBlock,
    block_six_up: Stage,
    block_seven: ConvBlock,
    block_seven_up: Stage,
    block_eight: ConvBlock,
    block_eight_up: Stage,
    block_nine: ConvBlock,
    out_conv: Conv3d,
}

impl Decoder {
    fn new(f: usize, classes: usize, deconv: bool, rng: &mut Rng) -> Self {
        let up = |cin, cout, rng: &mut Rng| {
            if deconv {
                Stage::UpDeconv(ConvTranspose3d::new(cin, cout, 2, rng), BatchNorm::new(cout))
            } else {
                Stage::UpLinear(Conv3d::new(cin, cout, 3, 1, 1, rng), BatchNorm::new(cout))
            }
        };
        Decoder {
            block_five_up: up(16 * f, 8 * f, rng),
            block_six: ConvBlock::new(3, 8 * f, 8 * f, rng),
            block_six_up: up(8 * f, 4 * f, rng),
            block_seven: ConvBlock::new(3, 4 * f, 4 * f, rng),
            block_seven_up: up(4 * f, 2 * f, rng),
            block_eight: ConvBlock::new(2, 2 * f, 2 * f, rng),
            block_eight_up: up(2 * f, f, rng),
            block_nine: ConvBlock::new(1, f, f, rng),
            out_conv: Conv3d::new(f, classes, 1, 1, 0, rng),
        }
    }

    /// (logits [N, classes, ...], embedding x9 after dropout [N, F, ...]).
    fn forward(&self, feat: &Features, train: Option<u64>, site: u64, p: f32) -> (Tensor, Tensor) {
        let t = train.is_some();
        let [x1, x2, x3, x4] = &feat.skips;
        let x = self.block_five_up.forward(&feat.x5, t).add(x4);
        let x = self.block_six_up.forward(&self.block_six.forward(&x, t), t).add(x3);
        let x = self.block_seven_up.forward(&self.block_seven.forward(&x, t), t).add(x2);
        let x = self.block_eight_up.forward(&self.block_eight.forward(&x, t), t).add(x1);
        let x9 = dropout(&self.block_nine.forward(&x, t), p, train, site);
        (self.out_conv.forward(&x9, t), x9)
    }

    fn named(&self, prefix: &str, params: &mut Named, buffers: &mut Named) {
        self.block_five_up.named(&join(prefix, "block_five_up"), params, buffers);
        self.block_six.named(&join(prefix, "block_six"), params, buffers);
        self.block_six_up.named(&join(prefix, "block_six_up"), params, buffers);
        self.block_seven.named(&join(prefix, "block_seven"), params, buffers);
        self.block_seven_up.named(&join(prefix, "block_seven_up"), params, buffers);
        self.block_eight.named(&join(prefix, "block_eight"), params, buffers);
        self.block_eight_up.named(&join(prefix, "block_eight_up"), params, buffers);
        self.block_nine.named(&join(prefix, "block_nine"), params, buffers);
        self.out_conv.params(&join(prefix, "out_conv"), params);
    }
}

/// Linear, BatchNorm1d, ReLU, Linear at `0`, `1`, `3`.
pub struct Head {
    l0: Linear,
    bn: BatchNorm,
    l3: Linear,
}

impl Head {
    fn new(inp: usize, e: usize, rng: &mut Rng) -> Self {
        Head { l0: Linear::new(inp, e, rng), bn: BatchNorm::new(e), l3: Linear::new(e, e, rng) }
    }
    /// [rows, in] -> [rows, E]; `train` uses (and updates) the batch statistics of these rows.
    /// In evaluation the BatchNorm is an affine map with the running statistics, folded into the
    /// first layer (its ReLU in the layer's epilogue). The rows are voxels selected by a mask:
    /// their layers take the same kernels for any number of them ([`linear_selected`]).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            return self.l3.forward(&self.bn.forward_relu(&self.l0.forward(x, true), true), true);
        }
        let bn = &self.bn;
        let (w, b) = fold_batch_norm(bn, &self.l0.weight, &self.l0.bias, &bn.running_mean, &bn.running_var);
        linear_selected(&linear_relu_selected(x, &w, &b), &self.l3.weight, &self.l3.bias)
    }
    /// `pred.forward(&proj.forward(x, true), true).gather_rows(index)` for a projection head and
    /// the prediction head after it, in training mode (both BatchNorms' running statistics
    /// updated), with the projection head's last layer and the prediction head's first computed
    /// at the rows `index` (distinct) only. Every BatchNorm input over every row is an affine
    /// map of rows whose mean and covariance one pass gives ([`gram_rows_at`]): the projection
    /// head's first layer of x, and the prediction head's first layer after the projection
    /// head's last of its hidden rows h. So the statistics come from those moments, the
    /// projection head's first layer and BatchNorm are one linear layer (its ReLU applied where
    /// the moments of h read it), and the rest runs at the kept rows. An empty index updates the
    /// statistics alone. The rows x and the kept ones are selections whose numbers change from
    /// step to step: their layers take the same kernels for any number ([`linear_selected`]).
    pub fn pair_rows_at(proj: &Head, pred: &Head, x: &Tensor, index: &Tensor) -> Tensor {
        let (rows, f) = (x.dim(0), x.dim(1));
        let e = proj.l0.weight.dim(0);
        let out = pred.l0.weight.dim(0);
        let inv = 1.0 / rows as f32;
        // The mean [1, C] and covariance [C, C] of rows from their moments about `shift`.
        let moments = |g: &Tensor, c: usize, shift: &Tensor| {
            let d = g.narrow(0, c, 1).mul_scalar(inv);
            let cov = g.narrow(0, 0, c).mul_scalar(inv).sub(&matmul_t(&d, &d, true, false));
            (d.add(&shift.reshape(&[1, c])), cov)
        };
        // The first row is within a few standard deviations of the mean: moments about it keep
        // the covariance of columns with a large mean.
        let shift_x = x.detach().narrow(0, 0, 1).reshape(&[f]);
        let (mean_x, cov_x) =
            moments(&gram_rows_at(x, &shift_x, &Tensor::empty_u32(&[0]), false), f, &shift_x);
        let w0 = &proj.l0.weight;
        let mean = linear(&mean_x, w0, Some(&proj.l0.bias)).reshape(&[e]);
        let var = w0.matmul(&cov_x).mul(w0).sum(&[1], false);
        no_grad(|| proj.bn.update_running(&mean, &var, rows));
        let (w, b) = fold_batch_norm(&proj.bn, w0, &proj.l0.bias, &mean, &var);
        // The hidden rows h = relu(z), the ReLU applied where the moments op reads z.
        let z = linear_selected(x, &w, &b);
        // h where the normalized input is zero: near the mean of a column whose BatchNorm bias
        // outweighs its scale, where the moments about zero would lose the variance to rounding.
        let shift = proj.bn.bias.detach().relu();
        let g = gram_rows_at(&z, &shift, index, true);
        let (mean_h, cov) = moments(&g, e, &shift);
        // Over every row the prediction head's first layer gives h M^T + c, M = W_pred W_proj,
        // c = W_pred b_proj + b_pred: its mean and variance follow from h's.
        let m = pred.l0.weight.matmul(&proj.l3.weight);
        let c = linear(&proj.l3.bias.reshape(&[1, e]), &pred.l0.weight, Some(&pred.l0.bias)).reshape(&[out]);
        let mean = linear(&mean_h, &m, Some(&c)).reshape(&[out]);
        let var = m.matmul(&cov).mul(&m).sum(&[1], false);
        no_grad(|| pred.bn.update_running(&mean, &var, rows));
        let k = index.numel();
        if k == 0 {
            return Tensor::zeros(&[0, pred.l3.weight.dim(0)]);
        }
        // At the kept rows, both layers and the normalization are one affine map of h.
        let (w, b) = fold_batch_norm(&pred.bn, &m, &c, &mean, &var);
        let y = linear_relu_selected(&g.narrow(0, e + 1, k), &w, &b);
        linear_selected(&y, &pred.l3.weight, &pred.l3.bias)
    }
    fn named(&self, prefix: &str, params: &mut Named, buffers: &mut Named) {
        self.l0.params(&join(prefix, "0"), params);
        self.bn.params(&join(prefix, "1"), params);
        self.bn.buffers(&join(prefix, "1"), buffers);
        self.l3.params(&join(prefix, "3"), params);
    }
}

/// BatchNorm with statistics (`mean`, `var` [C]) after a linear layer (`w` [C, in], `b` [C]) as
/// one linear layer: the weight and bias of bn(x w^T + b).
fn fold_batch_norm(bn: &BatchNorm, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor) -> (Tensor, Tensor) {
    let scale = bn.weight.div(&var.add_scalar(bn.eps).sqrt());
    (w.mul(&scale.reshape(&[w.dim(0), 1])), b.sub(mean).mul(&scale).add(&bn.bias))
}

/// Everything one forward pass of both networks produces.
pub struct Outputs {
    pub out_v: Tensor,
    pub out_a: Tensor,
    pub emb_v: Tensor,
    pub emb_a: Tensor,
}

pub struct Caml {
    pub width: usize,
    pub embed: usize,
    /// Dropout3d probability in training mode (0.5 in the reference).
    pub dropout: f32,
    pub encoder1: Encoder,
    pub encoder2: Encoder,
    pub decoder1: Decoder,
    pub decoder2: Decoder,
    pub projection_head1: Head,
    pub prediction_head1: Head,
    pub projection_head2: Head,
    pub prediction_head2: Head,
}

impl Caml {
    /// F = `width` (16 in the paper), E = `embed` (32), 1 input channel, 2 classes. `cma` builds
    /// the auxiliary encoder's attention (the paper's method; off for the ablations).
    pub fn new(width: usize, embed: usize, cma: bool, seed: u64) -> Caml {
        let mut rng = Rng::new(seed);
        let rng = &mut rng;
        Caml {
            width,
            embed,
            dropout: 0.5,
            encoder1: Encoder::new(width, false, rng),
            encoder2: Encoder::new(width, cma, rng),
            decoder1: Decoder::new(width, 2, true, rng),
            decoder2: Decoder::new(width, 2, false, rng),
            projection_head1: Head::new(width, embed, rng),
            prediction_head1: Head::new(embed, embed, rng),
            projection_head2: Head::new(width, embed, rng),
            prediction_head2: Head::new(embed, embed, rng),
        }
    }

    /// Both networks on x [N, 1, X, Y, Z].
    pub fn forward(&self, x: &Tensor, train: Option<u64>) -> Outputs {
        let p = self.dropout;
        let f1 = self.encoder1.forward(x, train.map(|s| derive_seed(s, 1)), p);
        let (out_v, emb_v) = self.decoder1.forward(&f1, train, 2, p);
        drop(f1);
        let f2 = self.encoder2.forward(x, train.map(|s| derive_seed(s, 3)), p);
        let (out_a, emb_a) = self.decoder2.forward(&f2, train, 4, p);
        Outputs { out_v, out_a, emb_v, emb_a }
    }

    /// Decoder 1's logits only (inference: the plain network).
    pub fn forward_v(&self, x: &Tensor) -> Tensor {
        self.decoder1.forward(&self.encoder1.forward(x, None, 0.0), None, 2, 0.0).0
    }

    /// Decoder 2's logits in eval mode (CMA skipped).
    pub fn forward_a(&self, x: &Tensor) -> Tensor {
        self.decoder2.forward(&self.encoder2.forward(x, None, 0.0), None, 4, 0.0).0
    }

    /// (trainable parameters, buffers), each named as in PyTorch's state_dict.
    pub fn named(&self) -> (Named, Named) {
        let (mut p, mut b) = (Named::new(), Named::new());
        self.encoder1.named("encoder1", &mut p, &mut b);
        self.encoder2.named("encoder2", &mut p, &mut b);
        self.decoder1.named("decoder1", &mut p, &mut b);
        self.decoder2.named("decoder2", &mut p, &mut b);
        self.projection_head1.named("projection_head1", &mut p, &mut b);
        self.prediction_head1.named("prediction_head1", &mut p, &mut b);
        self.projection_head2.named("projection_head2", &mut p, &mut b);
        self.prediction_head2.named("prediction_head2", &mut p, &mut b);
        (p, b)
    }

    pub fn params(&self) -> Vec<Tensor> {
        self.named().0.into_iter().map(|(_, t)| t).collect()
    }
}

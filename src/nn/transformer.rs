//! PyTorch's `nn.TransformerEncoderLayer` (post-norm, ReLU, the defaults of PyTorch 1.8) with its
//! `nn.MultiheadAttention` and `nn.LayerNorm`, parameter names and initialization as PyTorch has
//! them. Tokens are laid out [S, L, d]: S independent sequences of L tokens each.
//!
//! Dropout masks come from counter-based hashes of a seed and the entry's position (the attention
//! probabilities' in `ops::attention::HashDropout`, the rest in `ops::dropout`), so a forward is a
//! pure function of its inputs and its seed, and no mask is stored.

use crate::ops::attention::{HashDropout, attention, attention_composed};
use crate::rng::Rng;
pub use crate::rng::derive_seed;
use crate::tensor::Tensor;

fn uniform(rng: &mut Rng, shape: &[usize], bound: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::variable(&rng.vec(n, -bound, bound), shape)
}

/// x [rows, in] -> [rows, out] = x w^T + b, w [out, in] (`nn.Linear`).
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    crate::ops::linear::linear(x, w, Some(b))
}

/// Elementwise dropout of x seen as [rows, cols], training only (`nn.Dropout`).
fn dropout(x: &Tensor, p: f32, seed: Option<u64>) -> Tensor {
    match seed {
        Some(seed) => crate::ops::dropout::dropout(x, p, seed, true),
        None => x.clone(),
    }
}

/// `nn.LayerNorm(d)`: eps 1e-5, weight ones, bias zeros.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(d: usize) -> LayerNorm {
        LayerNorm {
            weight: Tensor::full(&[d], 1.0).into_variable(),
            bias: Tensor::zeros(&[d]).into_variable(),
            eps: 1e-5,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(&self.weight, &self.bias, self.eps)
    }
    pub fn params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        vec![(format!("{prefix}weight"), self.weight.clone()), (format!("{prefix}bias"), self.bias.clone())]
    }
}

/// Which implementation computes softmax(q k^T) v.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One kernel; the scores are never stored.
    Fused,
    /// matmul, softmax, matmul: the reference.
    Composed,
}

/// `nn.MultiheadAttention(d, heads, dropout)` used as self-attention.
pub struct MultiheadAttention {
    /// [3d, d]: the q, k and v projections stacked.
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj_weight: Tensor,
    pub out_proj_bias: Tensor,
    pub heads: usize,
    /// Dropout on the attention probabilities.
    pub dropout: f32,
}

impl MultiheadAttention {
    /// PyTorch's initialization: xavier_uniform_ in-projection, zero biases, the out-projection
    /// weight as `nn.Linear` makes it (kaiming_uniform_ with a = sqrt(5): U(-1/sqrt(d), 1/sqrt(d))).
    pub fn new(d: usize, heads: usize, dropout: f32, rng: &mut Rng) -> MultiheadAttention {
        MultiheadAttention {
            in_proj_weight: uniform(rng, &[3 * d, d], (6.0 / (4 * d) as f32).sqrt()),
            in_proj_bias: Tensor::zeros(&[3 * d]).into_variable(),
            out_proj_weight: uniform(rng, &[d, d], 1.0 / (d as f32).sqrt()),
            out_proj_bias: Tensor::zeros(&[d]).into_variable(),
            heads,
            dropout,
        }
    }

    /// x [S, L, d] -> [S, L, d]: each sequence attends to itself. `seed` Some: training-mode
    /// dropout on the probabilities.
    pub fn forward(&self, x: &Tensor, seed: Option<u64>, kernel: AttentionKernel) -> Tensor {
        let &[s, l, d] = x.shape() else { panic!("attention input {:?}: [S, L, d] expected", x.shape()) };
        let qkv =
            linear(&x.reshape(&[s * l, d]), &self.in_proj_weight, &self.in_proj_bias).reshape(&[s, l, 3 * d]);
        let dr = seed.filter(|_| self.dropout > 0.0).map(|seed| HashDropout { p: self.dropout, seed });
        let a = match kernel {
            AttentionKernel::Fused => attention(&qkv, self.heads, dr),
            AttentionKernel::Composed => attention_composed(&qkv, self.heads, dr),
        };
        linear(&a.reshape(&[s * l, d]), &self.out_proj_weight, &self.out_proj_bias).reshape(&[s, l, d])
    }

    pub fn params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{prefix}in_proj_weight"), self.in_proj_weight.clone()),
            (format!("{prefix}in_proj_bias"), self.in_proj_bias.clone()),
            (format!("{prefix}out_proj.weight"), self.out_proj_weight.clone()),
            (format!("{prefix}out_proj.bias"), self.out_proj_bias.clone()),
        ]
    }
}

/// `nn.TransformerEncoderLayer(d, heads, dim_feedforward, dropout)` with PyTorch's defaults:
/// x = norm1(x + dropout1(self_attn(x))); x = norm2(x + dropout2(linear2(dropout(relu(linear1(x)))))).
pub struct TransformerEncoderLayer {
    pub self_attn: MultiheadAttention,
    pub linear1_weight: Tensor,
    pub linear1_bias: Tensor,
    pub linear2_weight: Tensor,
    pub linear2_bias: Tensor,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub dropout: f32,
}

/// Dropout sites of one layer, each drawing its own mask.
const SITE_ATTN: u64 = 0;
const SITE_DROPOUT1: u64 = 1;
const SITE_DROPOUT: u64 = 2;
const SITE_DROPOUT2: u64 = 3;

impl TransformerEncoderLayer {
    /// Parameters drawn from `rng` as PyTorch initializes them (`nn.Linear`: weight and bias
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
    pub fn new(d: usize, heads: usize, dim_feedforward: usize, dropout: f32, rng: &mut Rng) -> Self {
        let self_attn = MultiheadAttention::new(d, heads, dropout, rng);
        let (b1, b2) = (1.0 / (d as f32).sqrt(), 1.0 / (dim_feedforward as f32).sqrt());
        TransformerEncoderLayer {
            self_attn,
            linear1_weight: uniform(rng, &[dim_feedforward, d], b1),
            linear1_bias: uniform(rng, &[dim_feedforward], b1),
            linear2_weight: uniform(rng, &[d, dim_feedforward], b2),
            linear2_bias: uniform(rng, &[d], b2),
            norm1: LayerNorm::new(d),
            norm2: LayerNorm::new(d),
            dropout,
        }
    }

    /// x [S, L, d] -> [S, L, d]. `seed` Some: training-mode dropout (every site draws a mask
    /// derived from it); None: no dropout, as in eval mode.
    pub fn forward(&self, x: &Tensor, seed: Option<u64>) -> Tensor {
        self.forward_with(x, seed, AttentionKernel::Fused)
    }

    pub fn forward_with(&self, x: &Tensor, seed: Option<u64>, kernel: AttentionKernel) -> Tensor {
        let &[s, l, d] = x.shape() else { panic!("encoder layer input {:?}: [S, L, d] expected", x.shape()) };
        let site = |k: u64| seed.map(|s| derive_seed(s, k));
        let sa = self.self_attn.forward(x, site(SITE_ATTN), kernel).reshape(&[s * l, d]);
        let x = x.reshape(&[s * l, d]);
        let x = self.norm1.forward(&x.add(&dropout(&sa, self.dropout, site(SITE_DROPOUT1))));
        let h = dropout(
            &linear(&x, &self.linear1_weight, &self.linear1_bias).relu(),
            self.dropout,
            site(SITE_DROPOUT),
        );
        let ff = linear(&h, &self.linear2_weight, &self.linear2_bias);
        self.norm2.forward(&x.add(&dropout(&ff, self.dropout, site(SITE_DROPOUT2)))).reshape(&[s, l, d])
    }

    /// (name, tensor) pairs under PyTorch's state_dict names, each prefixed with `prefix`.
    pub fn params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut p = self.self_attn.params(&format!("{prefix}self_attn."));
        p.extend([
            (format!("{prefix}linear1.weight"), self.linear1_weight.clone()),
            (format!("{prefix}linear1.bias"), self.linear1_bias.clone()),
            (format!("{prefix}linear2.weight"), self.linear2_weight.clone()),
            (format!("{prefix}linear2.bias"), self.linear2_bias.clone()),
        ]);
        p.extend(self.norm1.params(&format!("{prefix}norm1.")));
        p.extend(self.norm2.params(&format!("{prefix}norm2.")));
        p
    }
}

/// CPU reference of the layer without dropout (f64 arithmetic), for the tests.
pub mod cpu {
    use crate::ops::attention::cpu::attention;
    use crate::ops::layernorm::cpu::layer_norm;

    /// The layer's parameters as host vectors, in `params()` order.
    pub struct LayerParams {
        pub in_proj_weight: Vec<f32>,
        pub in_proj_bias: Vec<f32>,
        pub out_proj_weight: Vec<f32>,
        pub out_proj_bias: Vec<f32>,
        pub linear1_weight: Vec<f32>,
        pub linear1_bias: Vec<f32>,
        pub linear2_weight: Vec<f32>,
        pub linear2_bias: Vec<f32>,
        pub norm1_weight: Vec<f32>,
        pub norm1_bias: Vec<f32>,
        pub norm2_weight: Vec<f32>,
        pub norm2_bias: Vec<f32>,
    }

    impl LayerParams {
        pub fn read(layer: &super::TransformerEncoderLayer) -> LayerParams {
            let v: Vec<Vec<f32>> = layer.params("").into_iter().map(|(_, t)| t.to_vec()).collect();
            let mut it = v.into_iter();
            let mut next = || it.next().unwrap();
            LayerParams {
                in_proj_weight: next(),
                in_proj_bias: next(),
                out_proj_weight: next(),
                out_proj_bias: next(),
                linear1_weight: next(),
                linear1_bias: next(),
                linear2_weight: next(),
                linear2_bias: next(),
                norm1_weight: next(),
                norm1_bias: next(),
                norm2_weight: next(),
                norm2_bias: next(),
            }
        }
    }

    /// x [rows, in] w^T + b with w [out, in].
    pub fn linear(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let out = b.len();
        let inp = w.len() / out;
        x.chunks(inp)
            .flat_map(|row| {
                (0..out).map(move |o| {
                    (row.iter()
                        .zip(&w[o * inp..(o + 1) * inp])
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>()
                        + b[o] as f64) as f32
                })
            })
            .collect()
    }

    fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// x [s, l, d] -> [s, l, d], no dropout.
    pub fn encoder_layer(x: &[f32], [s, l, d]: [usize; 3], heads: usize, p: &LayerParams) -> Vec<f32> {
        let qkv = linear(x, &p.in_proj_weight, &p.in_proj_bias);
        let a = attention(&qkv, [s, l, d], heads, None);
        let sa = linear(&a, &p.out_proj_weight, &p.out_proj_bias);
        let x = layer_norm(&add(x, &sa), &p.norm1_weight, &p.norm1_bias, 1e-5);
        let h: Vec<f32> = linear(&x, &p.linear1_weight, &p.linear1_bias).iter().map(|v| v.max(0.0)).collect();
        let ff = linear(&h, &p.linear2_weight, &p.linear2_bias);
        layer_norm(&add(&x, &ff), &p.norm2_weight, &p.norm2_bias, 1e-5)
    }
}

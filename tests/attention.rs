//! LayerNorm, fused multi-head attention, PyTorch's TransformerEncoderLayer and the CMA
//! arrangement: against CPU references, the composed attention, and finite differences.

use caml_wgpu::caml::cma::{self, Cma};
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::nn::transformer::cpu::{LayerParams, encoder_layer};
use caml_wgpu::nn::transformer::{
    AttentionKernel, LayerNorm, MultiheadAttention, TransformerEncoderLayer, derive_seed,
};
use caml_wgpu::ops::attention::{self, HashDropout, attention, attention_composed, dropout_mask};
use caml_wgpu::ops::layernorm;
use caml_wgpu::{Tensor, backward};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: entry {i}: got {g}, want {w}");
    }
}

fn data(seed: u64, shape: &[usize], lo: f32, hi: f32) -> (Vec<f32>, Vec<usize>) {
    let n = shape.iter().product();
    (Rng::new(seed).vec(n, lo, hi), shape.to_vec())
}

// ---- LayerNorm ----

#[test]
fn layer_norm_matches_cpu() {
    for (rows, d) in [(300, 37), (259, 128)] {
        // An offset and spread per row, as activations have.
        let (mut x, _) = data(1, &[rows, d], -2.0, 2.0);
        for (i, v) in x.iter_mut().enumerate() {
            *v = *v * (1.0 + (i / d % 5) as f32) + (i / d % 7) as f32;
        }
        let (w, _) = data(2, &[d], 0.5, 1.5);
        let (b, _) = data(3, &[d], -0.5, 0.5);
        let y = Tensor::from_vec(&x, &[rows, d]).layer_norm(
            &Tensor::from_vec(&w, &[d]),
            &Tensor::from_vec(&b, &[d]),
            1e-5,
        );
        close(&y.to_vec(), &layernorm::cpu::layer_norm(&x, &w, &b, 1e-5), 1e-5, "layer_norm");
    }
}

#[test]
fn layer_norm_grads_match_finite_differences() {
    let x = data(4, &[3, 5, 8], -1.0, 1.0);
    let w = data(5, &[8], 0.5, 1.5);
    let b = data(6, &[8], -0.5, 0.5);
    check_gradients(&[x, w, b], Tolerance::default(), |t| {
        weighted_sum(&t[0].layer_norm(&t[1], &t[2], 1e-5), 1)
    });
}

// ---- dropout masks ----

#[test]
fn dropout_masks_match_the_cpu_hash_and_are_reproducible_from_the_seed() {
    let shape = [3, 37, 45];
    let n = 3 * 37 * 45;
    for p in [0.5f32, 0.2] {
        let dr = HashDropout { p, seed: 0x1234_5678_9abc };
        let m = dropout_mask(dr, shape).to_vec();
        assert_eq!(m, attention::cpu::dropout_mask(dr, shape), "GPU and CPU masks differ");
        assert_eq!(m, dropout_mask(dr, shape).to_vec(), "same seed, another mask");
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f32 / n as f32;
        assert!((kept - (1.0 - p)).abs() < 0.03, "kept fraction {kept} for p = {p}");
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - p)));
        let other = dropout_mask(HashDropout { p, seed: dr.seed + 1 }, shape).to_vec();
        let same = m.iter().zip(&other).filter(|(a, b)| a == b).count() as f32 / n as f32;
        // Independent masks agree on p^2 + (1-p)^2 of the entries.
        let expect = p * p + (1.0 - p) * (1.0 - p);
        assert!((same - expect).abs() < 0.03, "masks of seeds s and s+1 agree on {same}");
    }
    // Rows and columns of one mask are not copies of each other.
    let m = attention::cpu::dropout_mask(HashDropout { p: 0.5, seed: 7 }, [1, 64, 64]);
    assert!((1..64).all(|r| m[r * 64..(r + 1) * 64] != m[..64]), "a row repeats row 0");
}

// ---- attention ----

fn qkv_data(seed: u64, s: usize, l: usize, d: usize) -> (Vec<f32>, Vec<usize>) {
    data(seed, &[s, l, 3 * d], -1.0, 1.0)
}

#[test]
fn fused_attention_matches_cpu() {
    for &(s, l, d, heads) in &[(2, 45, 16, 2), (2, 37, 128, 4), (7, 4, 16, 4)] {
        let (x, shape) = qkv_data(10, s, l, d);
        let t = Tensor::from_vec(&x, &shape);
        for dropout in [None, Some(HashDropout { p: 0.5, seed: 99 })] {
            let got = attention(&t, heads, dropout).to_vec();
            close(&got, &attention::cpu::attention(&x, [s, l, d], heads, dropout), 1e-5, "fused vs cpu");
        }
    }
}

#[test]
fn fused_attention_matches_composed_values_and_grads() {
    // Lengths that are not multiples of the 8-row block nor of the rows a workgroup serves
    // (4 per invocation, up to 256), one over 256 (several workgroups per sequence and head), the
    // inter-sample shape (4 tokens) and a single token.
    for &(s, l, d, heads) in &[(2, 45, 16, 2), (3, 70, 64, 2), (1, 300, 16, 2), (5, 4, 16, 4), (1, 1, 8, 2)] {
        let (x, shape) = qkv_data(11, s, l, d);
        for dropout in [None, Some(HashDropout { p: 0.5, seed: 5 })] {
            let run = |fused: bool| {
                let v = Tensor::variable(&x, &shape);
                let y = if fused {
                    attention(&v, heads, dropout)
                } else {
                    attention_composed(&v, heads, dropout)
                };
                let grads = backward(&weighted_sum(&y, 12));
                (y.to_vec(), grads.get(&v).unwrap().to_vec())
            };
            let ((yf, gf), (yc, gc)) = (run(true), run(false));
            let what = format!("s {s} l {l} d {d} heads {heads} dropout {dropout:?}");
            close(&yf, &yc, 1e-5, &format!("values, {what}"));
            close(&gf, &gc, 1e-4, &format!("gradients, {what}"));
        }
    }
}

#[test]
fn split_attention_matches_the_unsplit_values_and_grads() {
    // The other side's tokens split into ranges summed separately (what a GPU runs): ranges that
    // do not divide the length, one range shorter than a block of 8, more ranges than fit.
    for &(s, l, d, heads, n) in &[(2, 45, 16, 2, 3), (1, 300, 16, 2, 5), (3, 70, 64, 2, 4), (2, 9, 8, 2, 40)]
    {
        let (x, shape) = qkv_data(17, s, l, d);
        for dropout in [None, Some(HashDropout { p: 0.5, seed: 8 })] {
            let run = |splits: usize| {
                attention::with_splits(splits, || {
                    let v = Tensor::variable(&x, &shape);
                    let y = attention(&v, heads, dropout);
                    let grads = backward(&weighted_sum(&y, 12));
                    (y.to_vec(), grads.get(&v).unwrap().to_vec())
                })
            };
            let ((ys, gs), (y1, g1)) = (run(n), run(1));
            let what = format!("s {s} l {l} d {d} heads {heads} splits {n} dropout {dropout:?}");
            assert_ne!(gs, g1, "{what}: the split run summed in the same order");
            close(&ys, &attention::cpu::attention(&x, [s, l, d], heads, dropout), 1e-5, &what);
            close(&ys, &y1, 1e-5, &format!("values, {what}"));
            close(&gs, &g1, 1e-4, &format!("gradients, {what}"));
        }
    }
}

#[test]
fn long_sequences_are_not_cut_short() {
    // 4000 tokens: an invocation's loops over the keys (forward, backward_q) and the queries
    // (backward_kv) pass over 500 blocks of 8 with 8 vec4 columns each, past the 65,535 loop
    // iterations after which a software device stops an invocation's loops.
    let (s, l, d, heads) = (1, 4000, 32, 1);
    let (x, shape) = qkv_data(15, s, l, d);
    let run = |fused: bool| {
        let v = Tensor::variable(&x, &shape);
        let y = if fused { attention(&v, heads, None) } else { attention_composed(&v, heads, None) };
        let grads = backward(&weighted_sum(&y, 16));
        (y.to_vec(), grads.get(&v).unwrap().to_vec())
    };
    let ((yf, gf), (yc, gc)) = (run(true), run(false));
    close(&yf, &attention::cpu::attention(&x, [s, l, d], heads, None), 1e-5, "long: fused vs cpu");
    close(&yf, &yc, 1e-5, "long: fused vs composed values");
    close(&gf, &gc, 1e-4, "long: fused vs composed gradients");
}

#[test]
fn fused_attention_grads_match_finite_differences() {
    // d = 8, 2 heads, 5 tokens, 3 sequences; with dropout the mask is fixed by the seed.
    let x = qkv_data(13, 3, 5, 8);
    for dropout in [None, Some(HashDropout { p: 0.5, seed: 21 })] {
        check_gradients(std::slice::from_ref(&x), Tolerance::default(), |t| {
            weighted_sum(&attention(&t[0], 2, dropout), 14)
        });
    }
}

// ---- TransformerEncoderLayer ----

/// A layer built from given tensors, in `params()` order.
fn layer_from(t: &[Tensor], heads: usize, dropout: f32) -> TransformerEncoderLayer {
    TransformerEncoderLayer {
        self_attn: MultiheadAttention {
            in_proj_weight: t[0].clone(),
            in_proj_bias: t[1].clone(),
            out_proj_weight: t[2].clone(),
            out_proj_bias: t[3].clone(),
            heads,
            dropout,
        },
        linear1_weight: t[4].clone(),
        linear1_bias: t[5].clone(),
        linear2_weight: t[6].clone(),
        linear2_bias: t[7].clone(),
        norm1: LayerNorm { weight: t[8].clone(), bias: t[9].clone(), eps: 1e-5 },
        norm2: LayerNorm { weight: t[10].clone(), bias: t[11].clone(), eps: 1e-5 },
        dropout,
    }
}

#[test]
fn encoder_layer_matches_cpu_without_dropout() {
    let (s, l, d) = (3, 7, 16);
    let layer = TransformerEncoderLayer::new(d, 2, 64, 0.5, &mut Rng::new(30));
    let (x, shape) = data(31, &[s, l, d], -1.0, 1.0);
    let want = encoder_layer(&x, [s, l, d], 2, &LayerParams::read(&layer));
    let xt = Tensor::from_vec(&x, &shape);
    close(&layer.forward(&xt, None).to_vec(), &want, 1e-4, "fused");
    close(&layer.forward_with(&xt, None, AttentionKernel::Composed).to_vec(), &want, 1e-4, "composed");
}

#[test]
fn encoder_layer_grads_match_finite_differences() {
    let (s, l, d, ff) = (3, 5, 8, 32);
    let layer = TransformerEncoderLayer::new(d, 2, ff, 0.0, &mut Rng::new(40));
    let mut inputs: Vec<(Vec<f32>, Vec<usize>)> =
        layer.params("").into_iter().map(|(_, t)| (t.to_vec(), t.shape().to_vec())).collect();
    // Non-trivial norm affines, and linear1 biases of +-3 that keep every ReLU input at least
    // 1 away from the kink (asserted below), so that differences of step 1e-2 never cross it;
    // half the hidden units are dead, checking that no gradient leaks through them.
    inputs[8].0 = Rng::new(41).vec(d, 0.5, 1.5);
    inputs[9].0 = Rng::new(42).vec(d, -0.5, 0.5);
    inputs[10].0 = Rng::new(43).vec(d, 0.5, 1.5);
    inputs[11].0 = Rng::new(44).vec(d, -0.5, 0.5);
    inputs[5].0 = (0..ff).map(|i| if i % 2 == 0 { 3.0 } else { -3.0 }).collect();
    inputs[1].0 = Rng::new(45).vec(3 * d, -0.5, 0.5);
    let x = data(46, &[s, l, d], -1.0, 1.0);
    {
        let t: Vec<Tensor> = inputs.iter().map(|(v, sh)| Tensor::from_vec(v, sh)).collect();
        let p = LayerParams::read(&layer_from(&t, 2, 0.0));
        let qkv = caml_wgpu::nn::transformer::cpu::linear(&x.0, &p.in_proj_weight, &p.in_proj_bias);
        let a = attention::cpu::attention(&qkv, [s, l, d], 2, None);
        let sa = caml_wgpu::nn::transformer::cpu::linear(&a, &p.out_proj_weight, &p.out_proj_bias);
        let sum: Vec<f32> = x.0.iter().zip(&sa).map(|(a, b)| a + b).collect();
        let n1 = layernorm::cpu::layer_norm(&sum, &p.norm1_weight, &p.norm1_bias, 1e-5);
        let pre = caml_wgpu::nn::transformer::cpu::linear(&n1, &p.linear1_weight, &p.linear1_bias);
        let margin = pre.iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
        assert!(margin > 1.0, "a ReLU input lies {margin} from the kink");
    }
    inputs.insert(0, x);
    check_gradients(&inputs, Tolerance::default(), |t| {
        weighted_sum(&layer_from(&t[1..], 2, 0.0).forward(&t[0], None), 47)
    });
}

#[test]
fn encoder_layer_dropout_is_reproducible_from_the_seed() {
    let (s, l, d) = (2, 19, 16);
    let layer = TransformerEncoderLayer::new(d, 2, 64, 0.5, &mut Rng::new(50));
    let (x, shape) = data(51, &[s, l, d], -1.0, 1.0);
    let xt = Tensor::from_vec(&x, &shape);
    let a = layer.forward(&xt, Some(7)).to_vec();
    assert_eq!(a, layer.forward(&xt, Some(7)).to_vec(), "same seed, another output");
    let b = layer.forward(&xt, Some(8)).to_vec();
    let differ = a.iter().zip(&b).filter(|(u, v)| u != v).count();
    assert!(differ > a.len() / 2, "seeds 7 and 8 agree on {} of {} outputs", a.len() - differ, a.len());
    let plain = layer.forward(&xt, None).to_vec();
    assert!(a.iter().zip(&plain).any(|(u, v)| (u - v).abs() > 1e-3), "dropout changed nothing");
    // The composed attention applies the very masks of the fused kernel.
    close(
        &layer.forward_with(&xt, Some(7), AttentionKernel::Composed).to_vec(),
        &a,
        1e-4,
        "composed, dropout on",
    );
    assert_ne!(derive_seed(7, 0), derive_seed(7, 1));
}

// ---- CMA ----

#[test]
fn cma_matches_the_cpu_arrangement_without_dropout() {
    let (n, c, dims) = (3, 16, [2, 3, 2]);
    let v = 12;
    let cma = Cma::new(c, 2, 32, 0.0, 60);
    let (x, _) = data(61, &[n, c, v], -1.0, 1.0);
    let shape = [n, c, dims[0], dims[1], dims[2]];
    let got = cma.forward(&Tensor::from_vec(&x, &shape), Some(3));
    assert_eq!(got.shape(), &shape);
    let (intra, inter) = (LayerParams::read(&cma.intra_attention), LayerParams::read(&cma.inter_attention));
    close(&got.to_vec(), &cma::cpu::cma(&x, [n, c, v], 2, &intra, &inter), 1e-4, "cma");
}

#[test]
fn cma_is_the_identity_in_eval_mode() {
    let cma = Cma::new(16, 2, 32, 0.5, 62);
    let (x, _) = data(63, &[2, 16, 3, 2, 2], -1.0, 1.0);
    let xt = Tensor::from_vec(&x, &[2, 16, 3, 2, 2]);
    assert_eq!(cma.forward(&xt, None).to_vec(), x);
    assert_ne!(cma.forward(&xt, Some(1)).to_vec(), x);
}

#[test]
fn cma_params_follow_the_reference_names_shapes_and_init() {
    let cma = Cma::new(128, 4, 512, 0.5, 70);
    let params = cma.params("encoder2.");
    let layer_keys: [(&str, &[usize]); 12] = [
        ("self_attn.in_proj_weight", &[384, 128]),
        ("self_attn.in_proj_bias", &[384]),
        ("self_attn.out_proj.weight", &[128, 128]),
        ("self_attn.out_proj.bias", &[128]),
        ("linear1.weight", &[512, 128]),
        ("linear1.bias", &[512]),
        ("linear2.weight", &[128, 512]),
        ("linear2.bias", &[128]),
        ("norm1.weight", &[128]),
        ("norm1.bias", &[128]),
        ("norm2.weight", &[128]),
        ("norm2.bias", &[128]),
    ];
    let want: Vec<(String, Vec<usize>)> = ["intra", "inter"]
        .iter()
        .flat_map(|w| {
            layer_keys
                .iter()
                .map(move |(k, s)| (format!("encoder2.{w}_attention.encoder_layers.{k}"), s.to_vec()))
        })
        .collect();
    let got: Vec<(String, Vec<usize>)> =
        params.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
    assert_eq!(got, want);
    assert_eq!(params.iter().map(|(_, t)| t.numel()).sum::<usize>(), 396_544);
    assert!(params.iter().all(|(_, t)| t.is_variable()));

    // U(-bound, bound) draws reach close to the bound and never past it.
    let check_uniform = |name: &str, v: &[f32], bound: f32| {
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max <= bound && max > 0.95 * bound, "{name}: max |w| {max}, bound {bound}");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.1 * bound, "{name}: mean {mean}");
    };
    let value = |i: usize| params[i].1.to_vec();
    check_uniform("in_proj_weight (xavier)", &value(0), (6.0f32 / 512.0).sqrt());
    check_uniform("out_proj.weight", &value(2), 1.0 / 128f32.sqrt());
    check_uniform("linear1.weight", &value(4), 1.0 / 128f32.sqrt());
    check_uniform("linear1.bias", &value(5), 1.0 / 128f32.sqrt());
    check_uniform("linear2.weight", &value(6), 1.0 / 512f32.sqrt());
    check_uniform("linear2.bias", &value(7), 1.0 / 512f32.sqrt());
    for (i, fill) in [(1, 0.0), (3, 0.0), (8, 1.0), (9, 0.0), (10, 1.0), (11, 0.0)] {
        assert!(value(i).iter().all(|&v| v == fill), "{} is not all {fill}", params[i].0);
    }
    // Seeded: the same seed gives the same weights, another seed others; the two layers differ.
    let again = Cma::new(128, 4, 512, 0.5, 70).params("");
    assert_eq!(again[0].1.to_vec(), value(0));
    assert_ne!(Cma::new(128, 4, 512, 0.5, 71).params("")[0].1.to_vec(), value(0));
    assert_ne!(value(12), value(0));
}

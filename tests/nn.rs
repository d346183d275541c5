//! The nn layers: PyTorch names, shapes and default initialization, training and evaluation
//! modes, gradients reaching every parameter; and the channel softmax / argmax the heads use.

use caml_wgpu::gradcheck::{Rng, weighted_sum};
use caml_wgpu::nn::{BatchNorm, Conv3d, ConvTranspose3d, Dropout3d, Linear, Named};
use caml_wgpu::ops::reduce;
use caml_wgpu::{Tensor, backward};

fn names(list: &Named) -> Vec<(&str, Vec<usize>)> {
    list.iter().map(|(n, t)| (n.as_str(), t.shape().to_vec())).collect()
}

/// All values within the bound, and the extremes near it (U(-bound, bound) drawn, not a narrower law).
fn assert_uniform_within(t: &Tensor, bound: f32, what: &str) {
    let v = t.to_vec();
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max <= bound, "{what}: |value| {max} over the bound {bound}");
    assert!(max >= 0.8 * bound, "{what}: largest |value| {max} far below the bound {bound}");
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    // The mean of n draws of U(-b, b) has standard deviation b / sqrt(3 n): allow five of them.
    let sd = bound as f64 / (3.0 * v.len() as f64).sqrt();
    assert!(mean.abs() < 5.0 * sd, "{what}: mean {mean} (standard deviation {sd})");
}

#[test]
fn layers_have_pytorch_names_shapes_and_default_init() {
    let mut rng = Rng::new(1337);
    let conv = Conv3d::new(16, 32, 3, 1, 1, &mut rng);
    let down = Conv3d::new(16, 32, 2, 2, 0, &mut rng);
    let up = ConvTranspose3d::new(32, 16, 2, &mut rng);
    let lin = Linear::new(16, 32, &mut rng);
    let mut p = Named::new();
    conv.params("encoder1.block_one.conv.0", &mut p);
    up.params("decoder1.block_five_up.conv.0", &mut p);
    lin.params("projection_head1.0", &mut p);
    assert_eq!(
        names(&p),
        vec![
            ("encoder1.block_one.conv.0.weight", vec![32, 16, 3, 3, 3]),
            ("encoder1.block_one.conv.0.bias", vec![32]),
            ("decoder1.block_five_up.conv.0.weight", vec![32, 16, 2, 2, 2]),
            ("decoder1.block_five_up.conv.0.bias", vec![16]),
            ("projection_head1.0.weight", vec![32, 16]),
            ("projection_head1.0.bias", vec![32]),
        ]
    );
    // kaiming_uniform_(a = sqrt(5)) = U(+-1/sqrt(fan_in)); ConvTranspose3d's fan_in is weight.size(1) * k^3.
    assert_uniform_within(&conv.weight, 1.0 / (16.0f32 * 27.0).sqrt(), "conv weight");
    assert_uniform_within(&conv.bias, 1.0 / (16.0f32 * 27.0).sqrt(), "conv bias");
    assert_uniform_within(&down.weight, 1.0 / (16.0f32 * 8.0).sqrt(), "down weight");
    assert_uniform_within(&up.weight, 1.0 / (16.0f32 * 8.0).sqrt(), "transposed conv weight");
    assert_uniform_within(&up.bias, 1.0 / (16.0f32 * 8.0).sqrt(), "transposed conv bias");
    assert_uniform_within(&lin.weight, 0.25, "linear weight");
    assert_uniform_within(&lin.bias, 0.25, "linear bias");
    assert!(conv.weight.is_variable() && lin.bias.is_variable());
    // The same seed gives the same parameters.
    let again = Conv3d::new(16, 32, 3, 1, 1, &mut Rng::new(1337));
    assert_eq!(again.weight.to_vec(), conv.weight.to_vec());
}

#[test]
fn batchnorm_layer_names_init_and_modes() {
    let bn = BatchNorm::new(3);
    let (mut p, mut b) = (Named::new(), Named::new());
    bn.params("encoder1.block_one.conv.1", &mut p);
    bn.buffers("encoder1.block_one.conv.1", &mut b);
    assert_eq!(
        names(&p),
        vec![("encoder1.block_one.conv.1.weight", vec![3]), ("encoder1.block_one.conv.1.bias", vec![3])]
    );
    assert_eq!(
        names(&b),
        vec![
            ("encoder1.block_one.conv.1.running_mean", vec![3]),
            ("encoder1.block_one.conv.1.running_var", vec![3]),
            ("encoder1.block_one.conv.1.num_batches_tracked", vec![]),
        ]
    );
    assert_eq!(bn.weight.to_vec(), vec![1.0; 3]);
    assert_eq!(bn.bias.to_vec(), vec![0.0; 3]);
    assert_eq!(bn.running_mean.to_vec(), vec![0.0; 3]);
    assert_eq!(bn.running_var.to_vec(), vec![1.0; 3]);
    let x = Tensor::from_vec(&Rng::new(2).vec(2 * 3 * 20, 1.0, 3.0), &[2, 3, 4, 5, 1]);
    let eval = bn.forward(&x, false).to_vec();
    // Fresh running statistics (0, 1): evaluation is x / sqrt(1 + eps).
    for (e, v) in eval.iter().zip(x.to_vec()) {
        assert!((e - v / (1.0f32 + 1e-5).sqrt()).abs() < 1e-6);
    }
    assert_eq!(bn.num_batches_tracked.to_u32(), vec![0], "evaluation counts no batch");
    bn.forward(&x, true);
    bn.forward_relu(&x, true);
    assert_eq!(bn.num_batches_tracked.to_u32(), vec![2]);
    assert!(bn.running_mean.to_vec().iter().all(|&m| m > 0.3), "running_mean moved towards the batch mean 2");
    // BatchNorm1d on rows of features.
    let rows = BatchNorm::new(4).forward(&Tensor::from_vec(&Rng::new(3).vec(40, -1.0, 1.0), &[10, 4]), true);
    let y = rows.to_vec();
    for f in 0..4 {
        let m: f32 = (0..10).map(|r| y[r * 4 + f]).sum::<f32>() / 10.0;
        assert!(m.abs() < 1e-5, "feature {f} mean {m} after BatchNorm1d");
    }
}

#[test]
fn dropout3d_layer_draws_reproducible_fresh_masks() {
    let x = Tensor::full(&[4, 64, 2, 1, 1], 1.0);
    let (a, b) = (Dropout3d::new(0.5, 7), Dropout3d::new(0.5, 7));
    let (a1, b1) = (a.forward(&x, true).to_vec(), b.forward(&x, true).to_vec());
    assert_eq!(a1, b1, "the same seed gives the same masks");
    assert_ne!(a.forward(&x, true).to_vec(), a1, "each call draws a new mask");
    assert!(a1.iter().all(|&v| v == 0.0 || v == 2.0));
    assert_eq!(a.forward(&x, false).to_vec(), vec![1.0; 512], "identity in evaluation");
}

#[test]
fn gradients_reach_every_parameter_of_a_block() {
    // Conv3d -> BatchNorm + ReLU -> Dropout3d -> ConvTranspose3d -> Conv3d k1.
    let mut rng = Rng::new(5);
    let conv = Conv3d::new(1, 4, 3, 1, 1, &mut rng);
    let bn = BatchNorm::new(4);
    let drop = Dropout3d::new(0.5, 9);
    let up = ConvTranspose3d::new(4, 3, 2, &mut rng);
    let out = Conv3d::new(3, 2, 1, 1, 0, &mut rng);
    let x = Tensor::from_vec(&rng.vec(2 * 4 * 3 * 5, -1.0, 1.0), &[2, 1, 4, 3, 5]);
    let h = drop.forward(&bn.forward_relu(&conv.forward(&x, true), true), true);
    let y = out.forward(&up.forward(&h, true), true);
    assert_eq!(y.shape(), &[2, 2, 8, 6, 10]);
    let g = backward(&weighted_sum(&y, 3));
    let mut params = Named::new();
    conv.params("conv", &mut params);
    bn.params("bn", &mut params);
    up.params("up", &mut params);
    out.params("out", &mut params);
    for (name, t) in &params {
        let gt = g.get(t).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(gt.shape(), t.shape(), "{name}");
        assert!(gt.to_vec().iter().any(|&v| v != 0.0), "{name}: an all-zero gradient");
    }
}

#[test]
fn channel_softmax_and_argmax_match_cpu_with_first_index_ties() {
    let shape = [2, 2, 5, 6, 7];
    let n: usize = shape.iter().product();
    let mut x = Rng::new(11).vec(n, -3.0, 3.0);
    // Ties between the two classes at every third voxel.
    let plane = 5 * 6 * 7;
    for s in 0..2 {
        for v in (0..plane).step_by(3) {
            x[(s * 2 + 1) * plane + v] = x[s * 2 * plane + v];
        }
    }
    let t = Tensor::from_vec(&x, &shape);
    let sm = t.softmax(1).to_vec();
    for (i, (g, w)) in sm.iter().zip(reduce::cpu::softmax(&x, &shape, 1, false)).enumerate() {
        assert!((g - w).abs() < 1e-6, "softmax entry {i}: {g} vs {w}");
    }
    let arg = t.argmax(1);
    assert_eq!(arg.shape(), &[2, 1, 5, 6, 7]);
    let arg = arg.to_vec();
    assert_eq!(arg, reduce::cpu::max_axis(&x, &shape, 1).1);
    for s in 0..2 {
        for v in (0..plane).step_by(3) {
            assert_eq!(arg[s * plane + v], 0.0, "a tie picks the first class, as torch.argmax does");
        }
    }
}

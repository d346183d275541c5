//! f16 storage of saved activations: packing against the `half` crate, and gradients computed
//! from f16-stored activations against the f32 ones.

use caml_wgpu::autograd::with_f16_storage;
use caml_wgpu::gradcheck::{Rng, weighted_sum};
use caml_wgpu::nn::batchnorm::BatchNorm;
use caml_wgpu::nn::conv::{Conv3d, ConvTranspose3d};
use caml_wgpu::nn::linear::Linear;
use caml_wgpu::ops::{half as packing, with_binding_limit};
use caml_wgpu::{Tensor, backward};

/// f16 values one rounding step apart at most (WGSL lets the conversion round either way).
fn within_one_f16_step(got: f32, v: f32) -> bool {
    let want = half::f16::from_f32(v.clamp(-65504.0, 65504.0));
    let h = half::f16::from_f32(got);
    h.to_f32() == got && h.to_bits().abs_diff(want.to_bits()) <= 1
}

#[test]
fn packing_rounds_to_f16_and_back() {
    let mut rng = Rng::new(41);
    let mut values: Vec<f32> = rng.vec(5001, -3.0, 3.0);
    values[0] = 1e-6; // subnormal in f16
    values[1] = -7e4; // past the f16 range: clamped to -65504
    values[2] = 0.1;
    values[5000] = 2.5; // the odd last value shares a word with padding
    for limit in [None, Some(4096)] {
        let run = || {
            let x = Tensor::from_vec(&values, &[5001]);
            let words = packing::pack(&x);
            assert_eq!(words.numel(), 2501);
            packing::unpack(&words, &[5001]).to_vec()
        };
        let got = match limit {
            Some(bytes) => with_binding_limit(bytes, run),
            None => run(),
        };
        for (i, (&g, &v)) in got.iter().zip(&values).enumerate() {
            assert!(within_one_f16_step(g, v), "limit {limit:?}, value {i}: {v} came back as {g}");
        }
        assert_eq!(got[1], -65504.0);
        assert_eq!(got[5000], 2.5);
    }
}

#[test]
fn gradients_from_f16_activations_stay_close_to_f32() {
    let mut rng = caml_wgpu::rng::Rng::new(42);
    let conv1 = Conv3d::new(3, 4, 3, 1, 1, &mut rng);
    let bn = BatchNorm::new(4);
    let conv2 = Conv3d::new(4, 4, 2, 2, 0, &mut rng);
    let up = ConvTranspose3d::new(4, 4, 2, &mut rng);
    let lin = Linear::new(4, 32, &mut rng);
    let x = Rng::new(43).vec(2 * 3 * 16 * 16 * 12, -1.0, 1.0);
    let run = |half: bool| {
        let xv = Tensor::variable(&x, &[2, 3, 16, 16, 12]);
        let loss = with_f16_storage(half, || {
            let h = bn.forward_relu(&conv1.forward(&xv, true), true);
            let h = up.forward(&conv2.forward(&h, true), true);
            let rows = h.permute(&[0, 2, 3, 4, 1]).reshape(&[2 * 16 * 16 * 12, 4]);
            weighted_sum(&lin.forward(&rows, true), 44)
        });
        let grads = backward(&loss);
        let params = [&xv, &conv1.weight, &bn.weight, &conv2.weight, &up.weight, &lin.weight];
        (loss.item(), params.map(|p| grads.get(p).unwrap().to_vec()))
    };
    let ((l32, g32), (l16, g16)) = (run(false), run(true));
    // The forward computes in f32 either way.
    assert_eq!(l32, l16);
    for (k, (a, b)) in g32.iter().zip(&g16).enumerate() {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err <= 1e-2 * scale, "gradient {k}: largest difference {err} against largest value {scale}");
        // The weights whose gradients read a stored activation of 4096 values or more (the
        // transposed convolution's input has 3072: kept in f32).
        if [1, 2, 3, 5].contains(&k) {
            assert!(a != b, "gradient {k} is identical: nothing was stored in f16");
        }
    }
}

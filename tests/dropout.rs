//! Dropout3d and elementwise dropout: the seeded mask against the CPU generator, its keep
//! fraction, the scaling, the backward, and evaluation mode.

use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::dropout::{cpu, dropout, dropout3d};
use caml_wgpu::{Tensor, backward};

#[test]
fn dropout3d_mask_matches_cpu_and_is_reproducible_from_the_seed() {
    let shape = [3, 5, 4, 3, 2];
    let x = Rng::new(1).vec(360, 0.5, 1.5);
    let xt = Tensor::from_vec(&x, &shape);
    for (p, seed) in [(0.5, 7u64), (0.3, 0xdead_beef_0000_0001), (0.9, u64::MAX)] {
        let y = dropout3d(&xt, p, seed, true).to_vec();
        assert_eq!(y, cpu::dropout(&x, 24, p, seed), "p {p} seed {seed}");
        assert_eq!(y, dropout3d(&xt, p, seed, true).to_vec(), "same seed, same mask");
        // Whole (sample, channel) volumes: all zero or all scaled by 1 / (1 - p).
        for (u, vol) in y.chunks(24).enumerate() {
            let kept = vol[0] != 0.0;
            for (v, &xv) in vol.iter().zip(&x[u * 24..]) {
                let want = if kept { xv / (1.0 - p) } else { 0.0 };
                assert!((v - want).abs() <= 1e-6 * want.abs(), "unit {u}: {v} vs {want}");
            }
        }
    }
    let a = dropout3d(&xt, 0.5, 1, true).to_vec();
    let b = dropout3d(&xt, 0.5, 2, true).to_vec();
    assert_ne!(a, b, "different seeds give different masks");
}

#[test]
fn dropout_keep_fraction_is_near_one_minus_p() {
    // 2^15 channels of 2 voxels: the kept fraction has standard deviation sqrt(p (1 - p) / 2^15) <=
    // 0.0028; a bound of 0.012 (over 4 standard deviations) fails a generator off by 0.02 in p.
    let units = 1 << 15;
    let x = Tensor::full(&[64, units / 64, 1, 2, 1], 1.0);
    for (p, seed) in [(0.5, 11u64), (0.2, 12), (0.8, 13), (0.5, 14)] {
        let y = dropout3d(&x, p, seed, true).to_vec();
        let kept = y.chunks(2).filter(|v| v[0] != 0.0).count() as f64 / units as f64;
        assert!((kept - (1.0 - p as f64)).abs() < 0.012, "p {p}: kept fraction {kept}");
        let scale = 1.0 / (1.0 - p);
        assert!(y.iter().all(|&v| v == 0.0 || v == scale), "kept values are 1 / (1 - p) = {scale}");
    }
    // Elementwise: every element its own unit.
    let x = Tensor::full(&[300, 111], 1.0);
    for (p, seed) in [(0.5, 21u64), (0.1, 22)] {
        let y = dropout(&x, p, seed, true).to_vec();
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - (1.0 - p as f64)).abs() < 0.012, "elementwise p {p}: kept fraction {kept}");
    }
}

#[test]
fn neighbouring_units_and_seeds_are_uncorrelated() {
    // Agreement between the masks of adjacent units, and of adjacent seeds, is 1/2 for independent
    // fair coins (standard deviation 0.0028 over 2^15 pairs).
    let n = 1 << 15;
    let keep = |u: u32, seed: u64| cpu::keep(u, 0.5, seed);
    let agree_units = (0..n).filter(|&u| keep(u, 5) == keep(u + 1, 5)).count() as f64 / n as f64;
    let agree_seeds = (0..n).filter(|&u| keep(u, 5) == keep(u, 6)).count() as f64 / n as f64;
    let agree_hi = (0..n).filter(|&u| keep(u, 5) == keep(u, 5 + (1 << 32))).count() as f64 / n as f64;
    for (what, a) in [("units", agree_units), ("seeds", agree_seeds), ("high seed bits", agree_hi)] {
        assert!((a - 0.5).abs() < 0.015, "adjacent {what} agree {a}");
    }
}

#[test]
fn elementwise_dropout_matches_cpu() {
    let x = Rng::new(3).vec(1001, -1.0, 1.0);
    let y = dropout(&Tensor::from_vec(&x, &[7, 143]), 0.25, 99, true).to_vec();
    assert_eq!(y, cpu::dropout(&x, 1, 0.25, 99));
}

#[test]
fn dropout_is_the_identity_in_eval_and_at_p_zero() {
    let x = Rng::new(4).vec(60, -1.0, 1.0);
    let xt = Tensor::from_vec(&x, &[2, 3, 10]);
    assert_eq!(dropout3d(&xt, 0.5, 1, false).to_vec(), x);
    assert_eq!(dropout(&xt, 0.5, 1, false).to_vec(), x);
    assert_eq!(dropout3d(&xt, 0.0, 1, true).to_vec(), x);
    assert!(dropout3d(&xt, 1.0, 1, true).to_vec().iter().all(|&v| v == 0.0));
}

#[test]
fn dropout_backward_applies_the_same_mask() {
    let shape = [2, 4, 3, 1, 2];
    let x = Rng::new(5).vec(48, -1.0, 1.0);
    let xv = Tensor::variable(&x, &shape);
    let dy = Rng::new(6).vec(48, -1.0, 1.0);
    let y = dropout3d(&xv, 0.5, 42, true);
    let g = backward(&y.mul(&Tensor::from_vec(&dy, &shape)).sum_all());
    let mask = cpu::dropout(&[1.0; 48], 6, 0.5, 42);
    let want: Vec<f32> = dy.iter().zip(&mask).map(|(d, m)| d * m).collect();
    assert_eq!(g.get(&xv).unwrap().to_vec(), want);
    check_gradients(&[(x.clone(), shape.to_vec())], Tolerance::default(), |t| {
        weighted_sum(&dropout3d(&t[0], 0.5, 42, true), 7)
    });
    check_gradients(&[(x, vec![6, 8])], Tolerance::default(), |t| {
        weighted_sum(&dropout(&t[0], 0.3, 43, true), 8)
    });
}

#[test]
fn dropout_splits_tensors_larger_than_one_storage_binding() {
    // 192 MB: runs of samples are bound separately on devices with a 128 MiB binding limit; the
    // unit numbering continues across runs.
    let shape = [3, 16, 112, 112, 80];
    let x = Tensor::full(&shape, 1.0);
    let y = dropout3d(&x, 0.5, 77, true).to_vec();
    let plane = 112 * 112 * 80;
    for u in 0..48 {
        let want = if cpu::keep(u as u32, 0.5, 77) { 2.0 } else { 0.0 };
        let vol = &y[u * plane..(u + 1) * plane];
        assert!(vol.iter().all(|&v| v == want), "unit {u}: want {want}");
    }
}

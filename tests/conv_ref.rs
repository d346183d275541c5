//! The reference convolutions against direct CPU loops and finite differences.

use caml_wgpu::Tensor;
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::conv_ref::{conv_transpose3d, conv3d, cpu};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what} entry {i}: got {g}, want {w}");
    }
}

#[test]
fn conv3d_matches_cpu_for_the_network_kernels() {
    // (k, stride, padding): ConvBlock k3 p1, Down k2 s2, out_conv k1; and k3 s2 p1 for coverage.
    let xs = [2, 3, 7, 6, 5];
    let x = Rng::new(1).vec(xs.iter().product(), -1.0, 1.0);
    for (k, stride, pad) in [(3, 1, 1), (2, 2, 0), (1, 1, 0), (3, 2, 1)] {
        let co = 4;
        let w = Rng::new(2).vec(co * 3 * k * k * k, -0.5, 0.5);
        let b = Rng::new(3).vec(co, -0.5, 0.5);
        let y = conv3d(
            &Tensor::from_vec(&x, &xs),
            &Tensor::from_vec(&w, &[co, 3, k, k, k]),
            &Tensor::from_vec(&b, &[co]),
            stride,
            pad,
        );
        let (want, o) = cpu::conv3d(&x, xs, &w, [co, k], &b, stride, pad);
        assert_eq!(y.shape(), &[2, co, o[0], o[1], o[2]]);
        close(&y.to_vec(), &want, 1e-5, &format!("k{k} s{stride} p{pad}"));
    }
}

#[test]
fn conv_transpose3d_matches_cpu() {
    let xs = [2, 3, 3, 4, 2];
    let x = Rng::new(4).vec(xs.iter().product(), -1.0, 1.0);
    let (co, k) = (5, 2);
    let w = Rng::new(5).vec(3 * co * 8, -0.5, 0.5);
    let b = Rng::new(6).vec(co, -0.5, 0.5);
    let y = conv_transpose3d(
        &Tensor::from_vec(&x, &xs),
        &Tensor::from_vec(&w, &[3, co, k, k, k]),
        &Tensor::from_vec(&b, &[co]),
    );
    let (want, o) = cpu::conv_transpose3d(&x, xs, &w, [co, k], &b, k);
    assert_eq!(o, [6, 8, 4]);
    assert_eq!(y.shape(), &[2, co, 6, 8, 4]);
    close(&y.to_vec(), &want, 1e-5, "conv_transpose3d");
}

#[test]
fn conv_grads_match_finite_differences() {
    let x = (Rng::new(10).vec(2 * 2 * 4 * 3 * 3, -1.0, 1.0), vec![2, 2, 4, 3, 3]);
    for (k, stride, pad) in [(3, 1, 1), (2, 2, 0)] {
        let w = (Rng::new(11).vec(3 * 2 * k * k * k, -0.5, 0.5), vec![3, 2, k, k, k]);
        let b = (Rng::new(12).vec(3, -0.5, 0.5), vec![3]);
        check_gradients(&[x.clone(), w, b], Tolerance::default(), |t| {
            weighted_sum(&conv3d(&t[0], &t[1], &t[2], stride, pad), 13)
        });
    }
    let w = (Rng::new(14).vec(2 * 3 * 8, -0.5, 0.5), vec![2, 3, 2, 2, 2]);
    let b = (Rng::new(15).vec(3, -0.5, 0.5), vec![3]);
    let xt = (Rng::new(16).vec(24, -1.0, 1.0), vec![2, 2, 2, 3, 1]);
    check_gradients(&[xt, w, b], Tolerance::default(), |t| {
        weighted_sum(&conv_transpose3d(&t[0], &t[1], &t[2]), 17)
    });
}

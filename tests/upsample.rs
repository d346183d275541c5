//! Trilinear x2 upsampling (align_corners=True) against the CPU reference and finite differences.

use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::upsample::{cpu, upsample_trilinear2x};
use caml_wgpu::{Tensor, backward};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what} entry {i}: got {g}, want {w}");
    }
}

// Scalar kernels (Z not a multiple of 4) with odd and size-1 axes, then the vec4 kernels (Z = 4, 8,
// 20), including rows of a single vec4 and size-1 X and Y.
const SHAPES: [[usize; 5]; 9] = [
    [2, 3, 5, 6, 7],
    [1, 2, 1, 4, 3],
    [1, 1, 1, 1, 1],
    [2, 1, 3, 1, 2],
    [1, 2, 9, 2, 1],
    [2, 3, 5, 3, 4],
    [1, 2, 1, 1, 4],
    [1, 1, 2, 3, 8],
    [1, 2, 7, 6, 20],
];

#[test]
fn upsample_matches_torch_on_a_known_case() {
    // Along an axis of size 2: sources 0, 1/3, 2/3, 1, so [0, 3] -> [0, 1, 2, 3]; size-1 axes repeat.
    let y = upsample_trilinear2x(&Tensor::from_vec(&[0.0, 3.0], &[1, 1, 2, 1, 1]));
    assert_eq!(y.shape(), &[1, 1, 4, 2, 2]);
    let want: Vec<f32> = [0.0, 1.0, 2.0, 3.0].iter().flat_map(|&v| [v; 4]).collect();
    close(&y.to_vec(), &want, 1e-6, "[0, 3] upsampled");
}

#[test]
fn upsample_matches_cpu_on_odd_and_unit_sizes() {
    for (k, s) in SHAPES.iter().enumerate() {
        let x = Rng::new(k as u64).vec(s.iter().product(), -2.0, 2.0);
        let y = upsample_trilinear2x(&Tensor::from_vec(&x, s));
        assert_eq!(y.shape(), &[s[0], s[1], 2 * s[2], 2 * s[3], 2 * s[4]]);
        let y = y.to_vec();
        close(&y, &cpu::upsample2x(&x, [s[0] * s[1], s[2], s[3], s[4]]), 5e-6, &format!("{s:?}"));
        // align_corners: the corners are copied exactly.
        assert_eq!(y[0], x[0]);
        assert_eq!(y[y.len() - 1], x[x.len() - 1]);
    }
}

#[test]
fn upsample_grad_matches_cpu_adjoint() {
    for (k, s) in SHAPES.iter().enumerate() {
        let x = Tensor::variable(&Rng::new(k as u64).vec(s.iter().product(), -1.0, 1.0), s);
        let out = [s[0], s[1], 2 * s[2], 2 * s[3], 2 * s[4]];
        let g = Rng::new(10 + k as u64).vec(out.iter().product(), -1.0, 1.0);
        let grads = backward(&upsample_trilinear2x(&x).mul(&Tensor::from_vec(&g, &out)).sum_all());
        let want = cpu::upsample2x_adjoint(&g, [s[0] * s[1], s[2], s[3], s[4]]);
        close(&grads.get(&x).unwrap().to_vec(), &want, 1e-5, &format!("adjoint {s:?}"));
    }
    // Decoder-sized planes: every candidate window of the gather lies inside the axis.
    let s = [1, 2, 14, 14, 10];
    let x = Tensor::variable(&Rng::new(20).vec(s.iter().product(), -1.0, 1.0), &s);
    let g = Rng::new(21).vec(8 * x.numel(), -1.0, 1.0);
    let grads = backward(&upsample_trilinear2x(&x).mul(&Tensor::from_vec(&g, &[1, 2, 28, 28, 20])).sum_all());
    close(
        &grads.get(&x).unwrap().to_vec(),
        &cpu::upsample2x_adjoint(&g, [2, 14, 14, 10]),
        1e-5,
        "adjoint 14x14x10",
    );
}

#[test]
fn upsample_grad_matches_finite_differences() {
    for s in [[1, 2, 3, 2, 2], [2, 1, 1, 3, 2], [1, 1, 2, 1, 8]] {
        let x = (Rng::new(30).vec(s.iter().product(), -1.0, 1.0), s.to_vec());
        check_gradients(&[x], Tolerance::default(), |t| weighted_sum(&upsample_trilinear2x(&t[0]), 31));
    }
}

#[test]
fn upsample_splits_tensors_larger_than_one_storage_binding() {
    // decoder2's last upsampling at batch 3: a 192 MB output, over a 128 MiB binding limit on
    // software devices, so runs of planes are bound separately.
    let s = [3, 16, 56, 56, 40];
    let x = Rng::new(40).vec(s.iter().product(), -1.0, 1.0);
    let y = upsample_trilinear2x(&Tensor::from_vec(&x, &s)).to_vec();
    close(&y, &cpu::upsample2x(&x, [48, 56, 56, 40]), 5e-6, "forward");
    let g = caml_wgpu::ops::upsample::upsample_trilinear2x_grad(
        &Tensor::from_vec(&y, &[3, 16, 112, 112, 80]),
        &s,
    );
    close(&g.to_vec(), &cpu::upsample2x_adjoint(&y, [48, 56, 56, 40]), 1e-5, "adjoint");
}

//! The Gram matrix, column sums and picked rows of many rows ([`gram_rows_at`]) against the CPU
//! and finite differences, on the one-pass kernel (many rows) and the composed fallback.

use caml_wgpu::Tensor;
use caml_wgpu::autograd::backward;
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::matmul::with_b_in_registers;
use caml_wgpu::ops::moments::{cpu, gram_rows_at};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what} entry {i}: got {g}, want {w}");
    }
}

/// Distinct rows out of `rows`, not sorted.
fn picks(rows: usize, k: usize, seed: u64) -> Vec<u32> {
    let mut all: Vec<u32> = (0..rows as u32).collect();
    let mut rng = Rng::new(seed);
    for i in (1..all.len()).rev() {
        all.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    all.truncate(k);
    all
}

#[test]
fn gram_rows_at_matches_cpu() {
    // Rows of a multiple of 4 columns take the one-pass kernel (subgroup adapters), however
    // many, others the composed ops; a column mean far from zero with a shift near it keeps the
    // moments exact enough to recover the covariance.
    for (rows, c, k, mean, relu) in [
        (5003, 32, 300, 0.0, false),
        (1500, 16, 0, 3.0, false),
        (2048, 4, 17, 0.5, false),
        (9, 3, 4, 0.0, false),
        (3001, 32, 200, 0.2, true),
        (11, 4, 3, 0.0, true),
    ] {
        let x: Vec<f32> = Rng::new(1).vec(rows * c, -1.0, 1.0).iter().map(|v| v + mean).collect();
        let shift = Rng::new(2).vec(c, mean - 0.1, mean + 0.1);
        let index = picks(rows, k, 3);
        let y = gram_rows_at(
            &Tensor::from_vec(&x, &[rows, c]),
            &Tensor::from_vec(&shift, &[c]),
            &Tensor::from_u32(&index, &[k]),
            relu,
        );
        assert_eq!(y.shape(), &[c + 1 + k, c]);
        let want = cpu::gram_rows_at(&x, &shift, &index, [rows, c], relu);
        close(&y.to_vec(), &want, 2e-5 * (rows as f32).sqrt(), &format!("rows {rows}, C {c}, relu {relu}"));
    }
}

/// Per row, (x_i - shift)(G + G^T) + g_s, plus the picked rows' gradients: the gradient in f64
/// (with `relu`, of relu(x), masked by x > 0).
fn grad_cpu(
    x: &[f32],
    shift: &[f32],
    index: &[u32],
    dy: &[f32],
    [rows, c]: [usize; 2],
    relu: bool,
) -> Vec<f32> {
    let v = |i: usize| if relu { x[i].max(0.0) } else { x[i] };
    let mut dx = vec![0.0f64; rows * c];
    for i in 0..rows {
        for b in 0..c {
            let mut s = dy[c * c + b] as f64;
            for a in 0..c {
                let d = v(i * c + a) as f64 - shift[a] as f64;
                s += d * (dy[a * c + b] as f64 + dy[b * c + a] as f64);
            }
            dx[i * c + b] = s;
        }
    }
    for (r, &i) in index.iter().enumerate() {
        for b in 0..c {
            dx[i as usize * c + b] += dy[(c + 1 + r) * c + b] as f64;
        }
    }
    if relu {
        for (d, &xi) in dx.iter_mut().zip(x) {
            if xi <= 0.0 {
                *d = 0.0;
            }
        }
    }
    dx.into_iter().map(|v| v as f32).collect()
}

#[test]
fn gram_rows_at_gradient_matches_cpu() {
    // Rows of a multiple of 4 columns take the tall kernel, however many, its B (here G + G^T)
    // passed round by shuffles or held in registers (both checked on every adapter); 3 columns
    // the composed ops.
    for (rows, c, k, relu, registers) in [
        (3001, 32, 250, false, false),
        (3001, 32, 250, false, true),
        (1200, 8, 0, false, true),
        (40, 4, 6, false, false),
        (2000, 32, 90, true, false),
        (2000, 32, 90, true, true),
        (30, 4, 5, true, false),
        (40, 3, 6, false, false),
        (30, 3, 5, true, false),
    ] {
        let x = Rng::new(4).vec(rows * c, -1.0, 1.0);
        let shift = Rng::new(5).vec(c, -0.2, 0.2);
        let index = picks(rows, k, 6);
        let xt = Tensor::variable(&x, &[rows, c]);
        let y = gram_rows_at(&xt, &Tensor::from_vec(&shift, &[c]), &Tensor::from_u32(&index, &[k]), relu);
        let dy = Rng::new(7).vec(y.numel(), -1.0, 1.0);
        let loss = y.mul(&Tensor::from_vec(&dy, y.shape())).sum_all();
        let g =
            with_b_in_registers(registers, || backward(&loss).get(&xt).expect("a gradient of x").to_vec());
        let want = grad_cpu(&x, &shift, &index, &dy, [rows, c], relu);
        let what = format!("gradient, rows {rows}, C {c}, relu {relu}, B in registers {registers}");
        close(&g, &want, 1e-5 * (c as f32), &what);
    }
}

#[test]
fn gram_rows_at_finite_differences() {
    // 4 columns take the one-pass and tall kernels (subgroup adapters), 3 the composed ops.
    for c in [4, 3] {
        let rows = 7;
        let x = Rng::new(8).vec(rows * c, -1.0, 1.0);
        let index = Tensor::from_u32(&[5, 1, 2], &[3]);
        let shift = Tensor::from_vec(&[0.1, -0.2, 0.3, 0.0][..c], &[c]);
        check_gradients(&[(x.clone(), vec![rows, c])], Tolerance::default(), |t| {
            weighted_sum(&gram_rows_at(&t[0], &shift, &index, false), 9)
        });
        // Of relu(x): values kept farther from zero than the difference step.
        let x: Vec<f32> = x.iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { *v }).collect();
        check_gradients(&[(x, vec![rows, c])], Tolerance::default(), |t| {
            weighted_sum(&gram_rows_at(&t[0], &shift, &index, true), 10)
        });
    }
}

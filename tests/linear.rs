//! Linear (y = x W^T + b) against the CPU reference and finite differences.

use caml_wgpu::Tensor;
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::linear::{cpu, linear};
use caml_wgpu::ops::matmul::with_b_in_registers;

#[test]
fn linear_matches_cpu() {
    for (rows, inp, out) in [(1, 16, 32), (301, 16, 32), (77, 33, 5)] {
        let x = Rng::new(1).vec(rows * inp, -1.0, 1.0);
        let w = Rng::new(2).vec(out * inp, -1.0, 1.0);
        let b = Rng::new(3).vec(out, -1.0, 1.0);
        let y = linear(
            &Tensor::from_vec(&x, &[rows, inp]),
            &Tensor::from_vec(&w, &[out, inp]),
            Some(&Tensor::from_vec(&b, &[out])),
        );
        assert_eq!(y.shape(), &[rows, out]);
        let want = cpu::linear(&x, &w, &b, [rows, inp, out]);
        for (i, (g, e)) in y.to_vec().iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{rows}x{inp}->{out} entry {i}: {g} vs {e}");
        }
    }
    // Leading axes are rows.
    let x = Rng::new(4).vec(2 * 3 * 4, -1.0, 1.0);
    let w = Rng::new(5).vec(5 * 4, -1.0, 1.0);
    let y = linear(&Tensor::from_vec(&x, &[2, 3, 4]), &Tensor::from_vec(&w, &[5, 4]), None);
    assert_eq!(y.shape(), &[2, 3, 5]);
    let want = cpu::linear(&x, &w, &[0.0; 5], [6, 4, 5]);
    for (g, e) in y.to_vec().iter().zip(&want) {
        assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()));
    }
}

#[test]
fn linear_grads_match_finite_differences() {
    let x = (Rng::new(10).vec(5 * 4, -1.0, 1.0), vec![5, 4]);
    let w = (Rng::new(11).vec(3 * 4, -1.0, 1.0), vec![3, 4]);
    let b = (Rng::new(12).vec(3, -1.0, 1.0), vec![3]);
    check_gradients(&[x.clone(), w.clone(), b], Tolerance::default(), |t| {
        weighted_sum(&linear(&t[0], &t[1], Some(&t[2])), 13)
    });
    // 256 rows, in a multiple of 4 and out of 8: the tall kernel with the bias in its epilogue
    // (on subgroup adapters), B by shuffles and in registers.
    let xt = (Rng::new(16).vec(256 * 4, -1.0, 1.0), vec![256, 4]);
    let wt = (Rng::new(17).vec(8 * 4, -1.0, 1.0), vec![8, 4]);
    let bt = (Rng::new(18).vec(8, -1.0, 1.0), vec![8]);
    for registers in [false, true] {
        check_gradients(&[xt.clone(), wt.clone(), bt.clone()], Tolerance::default(), |t| {
            with_b_in_registers(registers, || weighted_sum(&linear(&t[0], &t[1], Some(&t[2])), 19))
        });
    }
    // Many rows: the weight and bias gradients from one pass of the tall-reduction kernel (on
    // subgroup adapters); the input is a constant so that only those two are differenced. The
    // function is linear in them, so a step of 1 has no truncation error and keeps the rounding
    // of the 35,200-term sum small against it.
    let (rows, inp, out) = (1100, 16, 32);
    let xv = Rng::new(20).vec(rows * inp, -1.0, 1.0);
    let x = Tensor::from_vec(&xv, &[rows, inp]);
    let wl = (Rng::new(21).vec(out * inp, -1.0, 1.0), vec![out, inp]);
    let bl = (Rng::new(22).vec(out, -1.0, 1.0), vec![out]);
    let f = |t: &[Tensor]| weighted_sum(&linear(&x, &t[0], Some(&t[1])), 23);
    check_gradients(&[wl.clone(), bl.clone()], Tolerance { step: 1.0, ..Tolerance::default() }, f);
    // And against the CPU: dW = G^T x, db = the column sums of G, G the weights of the sum.
    let (wv, bv) = (Tensor::variable(&wl.0, &wl.1), Tensor::variable(&bl.0, &bl.1));
    let grads = caml_wgpu::autograd::backward(&f(&[wv.clone(), bv.clone()]));
    let g = Rng::new(23).vec(rows * out, -1.0, 1.0);
    let dw: Vec<f64> = (0..out * inp)
        .map(|e| (0..rows).map(|r| g[r * out + e / inp] as f64 * xv[r * inp + e % inp] as f64).sum())
        .collect();
    let db: Vec<f64> = (0..out).map(|o| (0..rows).map(|r| g[r * out + o] as f64).sum()).collect();
    for (got, want) in [(grads.get(&wv).unwrap().to_vec(), dw), (grads.get(&bv).unwrap().to_vec(), db)] {
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!((*a as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()), "entry {i}: {a} vs {e}");
        }
    }
    let x3 = (Rng::new(14).vec(2 * 3 * 4, -1.0, 1.0), vec![2, 3, 4]);
    check_gradients(&[x3, w], Tolerance::default(), |t| weighted_sum(&linear(&t[0], &t[1], None), 15));
}

#[test]
fn linear_relu_matches_cpu_and_finite_differences() {
    use caml_wgpu::ops::linear::linear_relu;
    // Many rows take the tall kernel with the ReLU in its epilogue (subgroup adapters, its B
    // passed round by shuffles or held in registers), few the composed ops; values near the
    // kink are kept away from it for the differences.
    for (rows, inp, out, registers) in [(1000, 4, 8, false), (1000, 4, 8, true), (7, 3, 5, false)] {
        let x = Rng::new(30).vec(rows * inp, -1.0, 1.0);
        let w = Rng::new(31).vec(out * inp, -1.0, 1.0);
        let b = Rng::new(32).vec(out, -0.5, 0.5);
        let y = with_b_in_registers(registers, || {
            linear_relu(
                &Tensor::from_vec(&x, &[rows, inp]),
                &Tensor::from_vec(&w, &[out, inp]),
                &Tensor::from_vec(&b, &[out]),
            )
        });
        let want: Vec<f32> = cpu::linear(&x, &w, &b, [rows, inp, out]).iter().map(|v| v.max(0.0)).collect();
        for (i, (g, e)) in y.to_vec().iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{rows} rows, entry {i}: {g} vs {e}");
        }
        // The rows whose pre-activations all lie farther from the kink than a difference step
        // moves them (at most 1e-2 (|x|_1 + 1) <= 5e-2): there the function is linear in the
        // weights and bias, so the step has no truncation error.
        let pre = cpu::linear(&x, &w, &b, [rows, inp, out]);
        let keep: Vec<usize> =
            (0..rows).filter(|&r| pre[r * out..(r + 1) * out].iter().all(|v| v.abs() > 0.06)).collect();
        let xs: Vec<f32> = keep.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].to_vec()).collect();
        let n = keep.len();
        // Enough rows for the tall kernel again where it took them.
        assert!(n >= 2 && (rows < 256 || n >= 256), "{n} of {rows} rows away from the kink");
        // The weights and bias are differenced with a small step against the kept rows.
        let xt = Tensor::from_vec(&xs, &[n, inp]);
        let tol = Tolerance { step: 1e-2, ..Tolerance::default() };
        check_gradients(&[(w.clone(), vec![out, inp]), (b.clone(), vec![out])], tol, |t| {
            with_b_in_registers(registers, || weighted_sum(&linear_relu(&xt, &t[0], &t[1]), 33))
        });
    }
}

#[test]
fn selected_rows_take_the_tall_kernels_however_few() {
    use caml_wgpu::ops::linear::{linear_relu_selected, linear_selected};
    // Rows selected by a mask take the tall kernel (subgroup adapters) and, for the weight and
    // bias gradients, the tall-reduction kernel, however few. The bias keeps every pre-activation
    // at least 0.8 from the ReLU's kink (half the columns above it, half below), farther than a
    // difference step moves it.
    let (inp, out) = (4, 8);
    for rows in [1, 3, 40] {
        let x = Rng::new(40).vec(rows * inp, -1.0, 1.0);
        let w = Rng::new(41).vec(out * inp, -0.3, 0.3);
        let b: Vec<f32> = (0..out).map(|o| if o % 2 == 0 { 2.0 } else { -2.0 }).collect();
        let (xt, wt, bt) = (
            Tensor::from_vec(&x, &[rows, inp]),
            Tensor::from_vec(&w, &[out, inp]),
            Tensor::from_vec(&b, &[out]),
        );
        let want = cpu::linear(&x, &w, &b, [rows, inp, out]);
        let relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
        for (y, want, what) in [
            (linear_selected(&xt, &wt, &bt), &want, "linear"),
            (linear_relu_selected(&xt, &wt, &bt), &relu, "relu"),
        ] {
            assert_eq!(y.shape(), &[rows, out]);
            for (i, (g, e)) in y.to_vec().iter().zip(want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{what}, {rows} rows, entry {i}: {g} vs {e}"
                );
            }
        }
        let args = [(x, vec![rows, inp]), (w, vec![out, inp]), (b, vec![out])];
        check_gradients(&args, Tolerance::default(), |t| {
            weighted_sum(&linear_selected(&t[0], &t[1], &t[2]), 43)
        });
        check_gradients(&args, Tolerance::default(), |t| {
            weighted_sum(&linear_relu_selected(&t[0], &t[1], &t[2]), 44)
        });
    }
}

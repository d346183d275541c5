//! The engine's ops against CPU references (random inputs, sizes that are not multiples of the
//! workgroup size) and their gradients against finite differences.
#![allow(clippy::cloned_ref_to_slice_refs)]

use approx::assert_relative_eq;
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::elementwise::{BinaryOp, UnaryOp, cpu as ew_cpu};
use caml_wgpu::ops::{layout, matmul, reduce, scan};
use caml_wgpu::{Tensor, backward};

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "entry {i}: got {g}, want {w}");
    }
}

fn data(seed: u64, shape: &[usize], lo: f32, hi: f32) -> (Vec<f32>, Vec<usize>) {
    let n = shape.iter().product();
    (Rng::new(seed).vec(n, lo, hi), shape.to_vec())
}

#[test]
fn binary_ops_match_cpu_with_broadcasting() {
    // Same shapes of 1005 (one value per invocation) and 816 values (four per invocation).
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 5, 67], &[3, 5, 67]),
        (&[3, 4, 68], &[3, 4, 68]),
        (&[3, 5, 7], &[1, 5, 1]),
        (&[2, 3, 4, 5], &[5]),
        (&[1, 4], &[3, 1]),
    ];
    for (k, &(sa, sb)) in cases.iter().enumerate() {
        let (a, _) = data(k as u64, sa, -2.0, 2.0);
        let (mut b, _) = data(100 + k as u64, sb, 0.5, 2.0);
        b[0] = a[0]; // one equal pair for Eq
        let (ta, tb) = (Tensor::from_vec(&a, sa), Tensor::from_vec(&b, sb));
        for op in [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Maximum,
            BinaryOp::Eq,
            BinaryOp::Gt,
            BinaryOp::Ge,
        ] {
            let got = caml_wgpu::ops::elementwise::binary(op, &ta, &tb);
            let (want, shape) = ew_cpu::binary(op, &a, sa, &b, sb);
            assert_eq!(got.shape(), &shape[..]);
            close(&got.to_vec(), &want, 1e-6);
        }
    }
}

#[test]
fn unary_ops_match_cpu() {
    // 1000 values (four per invocation) and 1001 (one per invocation).
    for n in [1000, 1001] {
        unary_ops_match_cpu_at(n);
    }
    let (neg, _) = data(8, &[300], -3.0, 3.0);
    let t = Tensor::from_vec(&neg, &[300]);
    close(&t.relu().to_vec(), &ew_cpu::unary(UnaryOp::Relu, &neg), 0.0);
    close(&t.powf(2.0).to_vec(), &ew_cpu::unary(UnaryOp::Pow(2.0), &neg), 1e-6);
    close(&t.powf(3.0).to_vec(), &ew_cpu::unary(UnaryOp::Pow(3.0), &neg), 1e-5);
    for n in [1000, 1001] {
        assert_eq!(Tensor::full(&[n], -1.5).to_vec(), vec![-1.5; n], "fill of {n}");
    }
}

fn unary_ops_match_cpu_at(n: usize) {
    let (x, s) = data(7, &[n], 0.1, 3.0);
    let t = Tensor::from_vec(&x, &s);
    for op in [
        UnaryOp::Relu,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Pow(3.0),
        UnaryOp::Pow(0.5),
        UnaryOp::Clamp(0.5, 2.0),
        UnaryOp::Affine(-2.0, 0.25),
    ] {
        close(&caml_wgpu::ops::elementwise::unary(op, &t).to_vec(), &ew_cpu::unary(op, &x), 1e-5);
    }
}

#[test]
fn sums_match_cpu_on_every_axis_and_long_axes() {
    let shape = [3, 37, 5, 11];
    let (x, _) = data(1, &shape, -1.0, 1.0);
    let t = Tensor::from_vec(&x, &shape);
    for axis in 0..4 {
        let got = t.sum(&[axis], true);
        let mut s = shape.to_vec();
        s[axis] = 1;
        assert_eq!(got.shape(), &s[..]);
        close(&got.to_vec(), &reduce::cpu::sum_axis(&x, &shape, axis), 1e-5);
    }
    // Two axes at once = one after the other.
    let two = t.sum(&[1, 3], false);
    assert_eq!(two.shape(), &[3, 5]);
    let step = reduce::cpu::sum_axis(&x, &shape, 3);
    close(&two.to_vec(), &reduce::cpu::sum_axis(&step, &[3, 37, 5], 1), 1e-5);
    // A long axis is summed in chunks.
    let n = 300_001;
    let (big, _) = data(2, &[n], -1.0, 1.0);
    let want: f64 = big.iter().map(|&v| v as f64).sum();
    assert_relative_eq!(Tensor::from_vec(&big, &[n]).sum_all().item() as f64, want, epsilon = 1e-2);
    let m = Tensor::from_vec(&big, &[n]).mean_all().item() as f64;
    assert_relative_eq!(m, want / n as f64, epsilon = 1e-7);
}

#[test]
fn max_argmax_and_softmax_match_cpu() {
    let shape = [4, 9, 130];
    let (x, _) = data(3, &shape, -4.0, 4.0);
    let t = Tensor::from_vec(&x, &shape);
    for axis in 0..3 {
        let (vals, args) = reduce::cpu::max_axis(&x, &shape, axis);
        close(&t.max_axis(axis).to_vec(), &vals, 0.0);
        close(&t.argmax(axis).to_vec(), &args, 0.0);
        close(&t.softmax(axis).to_vec(), &reduce::cpu::softmax(&x, &shape, axis, false), 1e-5);
        close(&t.log_softmax(axis).to_vec(), &reduce::cpu::softmax(&x, &shape, axis, true), 1e-5);
    }
    // Ties resolve to the first index, as torch.argmax does.
    let tie = Tensor::from_vec(&[1.0, 3.0, 3.0, 0.0], &[1, 4]);
    assert_eq!(tie.argmax(1).to_vec(), vec![1.0]);
}

#[test]
fn matmul_matches_cpu_for_every_transpose_and_batch() {
    let (b, m, k, n) = (3, 67, 45, 33);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (a, _) = data(4, &[b, m, k], -1.0, 1.0);
        let (bm, _) = data(5, &[b, k, n], -1.0, 1.0);
        let sa = if ta { [b, k, m] } else { [b, m, k] };
        let sb = if tb { [b, n, k] } else { [b, k, n] };
        let got = matmul::matmul_t(&Tensor::from_vec(&a, &sa), &Tensor::from_vec(&bm, &sb), ta, tb);
        assert_eq!(got.shape(), &[b, m, n]);
        close(&got.to_vec(), &matmul::matmul_cpu(&a, &bm, [b, m, k, n], ta, tb), 1e-5);
    }
    // Multiples of 4 (M odd unless A is transposed) take the 16-byte-load kernel; a long K with a
    // small product is summed in splits.
    // M >= 256 takes the tall kernel (subgroup adapters), 4, 8, 16 or 32 columns per workgroup,
    // B passed round by shuffles or, with K and N up to 32, held in registers: both on every
    // adapter.
    // With A transposed and B not, K need not be a multiple of 4.
    for registers in [false, true] {
        matmul::with_b_in_registers(registers, || {
            for (b, m, k, n) in [
                (3, 13, 12, 8),
                (1, 8, 4100, 4),
                (1, 12, 2048, 16),
                (2, 301, 12, 24),
                (1, 260, 8, 32),
                (2, 700, 32, 32),
                (1, 333, 4, 16),
                (2, 300, 8, 4),
                (1, 12, 4099, 8),
                (3, 16, 13, 8),
            ] {
                if k % 4 != 0 {
                    let (a, _) = data(16, &[b, k, m], -1.0, 1.0);
                    let (bm, _) = data(17, &[b, k, n], -1.0, 1.0);
                    let got = matmul::matmul_t(
                        &Tensor::from_vec(&a, &[b, k, m]),
                        &Tensor::from_vec(&bm, &[b, k, n]),
                        true,
                        false,
                    );
                    close(
                        &got.to_vec(),
                        &matmul::matmul_cpu(&a, &bm, [b, m, k, n], true, false),
                        1e-5 * (k as f32).sqrt(),
                    );
                    continue;
                }
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let m = if ta { m / 4 * 4 } else { m };
                    let (a, _) = data(14, &[b, m, k], -1.0, 1.0);
                    let (bm, _) = data(15, &[b, k, n], -1.0, 1.0);
                    let sa = if ta { [b, k, m] } else { [b, m, k] };
                    let sb = if tb { [b, n, k] } else { [b, k, n] };
                    let got =
                        matmul::matmul_t(&Tensor::from_vec(&a, &sa), &Tensor::from_vec(&bm, &sb), ta, tb);
                    assert_eq!(got.shape(), &[b, m, n]);
                    close(
                        &got.to_vec(),
                        &matmul::matmul_cpu(&a, &bm, [b, m, k, n], ta, tb),
                        1e-5 * (k as f32).sqrt(),
                    );
                }
            }
        });
    }
    // A long K with M and N up to 32 takes the tall-reduction kernel (subgroup adapters), which
    // also gives A's column sums; with N < M it computes B^T A and transposes it.
    for (m, k, n) in
        [(32, 5003, 32), (20, 1030, 8), (16, 4096, 32), (4, 2000, 4), (32, 3001, 4), (8, 1500, 28)]
    {
        let (a, _) = data(18, &[k, m], -1.0, 1.0);
        let (bm, _) = data(19, &[k, n], -1.0, 1.0);
        let (at, bt) = (Tensor::from_vec(&a, &[k, m]), Tensor::from_vec(&bm, &[k, n]));
        let (c, sums) = matmul::tall_tn(&at, &bt, true);
        assert_eq!(c.shape(), &[m, n]);
        let tol = 1e-5 * (k as f32).sqrt();
        close(&c.to_vec(), &matmul::matmul_cpu(&a, &bm, [1, m, k, n], true, false), tol);
        let want: Vec<f32> =
            (0..m).map(|j| (0..k).map(|r| a[r * m + j] as f64).sum::<f64>() as f32).collect();
        close(&sums.expect("column sums asked for").to_vec(), &want, tol);
        assert!(matmul::tall_tn(&at, &bt, false).1.is_none());
    }
    // A rank-2 right operand is shared by every batch entry.
    let (a, _) = data(6, &[2, 5, 70], -1.0, 1.0);
    let (w, _) = data(7, &[70, 3], -1.0, 1.0);
    let got = Tensor::from_vec(&a, &[2, 5, 70]).matmul(&Tensor::from_vec(&w, &[70, 3]));
    let want: Vec<f32> =
        (0..2).flat_map(|z| matmul::matmul_cpu(&a[z * 350..], &w, [1, 5, 70, 3], false, false)).collect();
    close(&got.to_vec(), &want, 1e-5);
}

#[test]
fn layout_ops_match_cpu() {
    let shape = [2, 3, 5, 7];
    let (x, _) = data(9, &shape, -1.0, 1.0);
    let t = Tensor::from_vec(&x, &shape);
    let perm = [0, 2, 3, 1];
    let p = t.permute(&perm);
    assert_eq!(p.shape(), &[2, 5, 7, 3]);
    close(&p.to_vec(), &layout::cpu::permute(&x, &shape, &perm), 0.0);
    // narrow then concat restores the tensor.
    let parts = [t.narrow(2, 0, 2), t.narrow(2, 2, 3)];
    assert_eq!(parts[1].shape(), &[2, 3, 3, 7]);
    assert_eq!(parts[1].to_vec()[0], x[2 * 7]);
    close(&Tensor::concat(&parts, 2).to_vec(), &x, 0.0);
    // Rows gathered by index, repeats allowed.
    let rows = t.reshape(&[6, 35]);
    let idx = [5u32, 0, 5, 2];
    let g = rows.gather_rows(&Tensor::from_u32(&idx, &[4]));
    let want: Vec<f32> =
        idx.iter().flat_map(|&i| x[i as usize * 35..(i as usize + 1) * 35].to_vec()).collect();
    close(&g.to_vec(), &want, 0.0);
}

#[test]
fn nonzero_compacts_in_order_across_many_blocks() {
    // 17M entries: block totals scanned at two further levels.
    for (n, density) in [(1usize, 1.0f32), (1000, 0.5), (5000, 0.1), (3_000_001, 0.3), (17_000_001, 0.01)] {
        let mut rng = Rng::new(n as u64);
        let mask: Vec<f32> = (0..n).map(|_| (rng.uniform() < density as f64) as u8 as f32).collect();
        let want: Vec<u32> = (0..n as u32).filter(|&i| mask[i as usize] != 0.0).collect();
        let got = scan::nonzero(&Tensor::from_vec(&mask, &[n]));
        assert_eq!(got.shape(), &[want.len()]);
        assert_eq!(got.to_u32(), want, "n = {n}");
    }
    let none = scan::nonzero(&Tensor::zeros(&[77]));
    assert_eq!(none.shape(), &[0]);
}

#[test]
fn select_rows_keeps_masked_rows() {
    let (x, _) = data(10, &[50, 3], -1.0, 1.0);
    let mask: Vec<f32> = (0..50).map(|i| (i % 3 == 1) as u8 as f32).collect();
    let got = Tensor::from_vec(&x, &[50, 3]).select_rows(&Tensor::from_vec(&mask, &[50]));
    let want: Vec<f32> = (0..50).filter(|i| i % 3 == 1).flat_map(|i| x[i * 3..i * 3 + 3].to_vec()).collect();
    assert_eq!(got.shape(), &[want.len() / 3, 3]);
    close(&got.to_vec(), &want, 0.0);
}

// ---- gradients ----

#[test]
fn binary_grads_match_finite_differences_with_broadcasting() {
    let a = data(20, &[2, 3, 4], -1.0, 1.0);
    let b = data(21, &[1, 3, 1], 0.5, 1.5);
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Maximum] {
        check_gradients(&[a.clone(), b.clone()], Tolerance::default(), |t| {
            weighted_sum(&caml_wgpu::ops::elementwise::binary(op, &t[0], &t[1]), 1)
        });
    }
    let s = data(22, &[4], 0.5, 1.5);
    check_gradients(&[a.clone(), s], Tolerance::default(), |t| weighted_sum(&t[0].div(&t[1]), 2));
}

#[test]
fn unary_grads_match_finite_differences() {
    // Away from relu's and clamp's kinks (|x| > 0.1 from 0, 0.5, 1.5).
    let x: Vec<f32> = vec![-1.3, -0.6, -0.2, 0.3, 0.7, 1.1, 1.8, 2.4];
    let pos: Vec<f32> = x.iter().map(|v| v.abs() + 0.2).collect();
    let shape = vec![2, 4];
    for op in
        [UnaryOp::Relu, UnaryOp::Exp, UnaryOp::Clamp(0.5, 1.5), UnaryOp::Affine(-1.5, 0.3), UnaryOp::Pow(3.0)]
    {
        check_gradients(&[(x.clone(), shape.clone())], Tolerance::default(), |t| {
            weighted_sum(&caml_wgpu::ops::elementwise::unary(op, &t[0]), 3)
        });
    }
    for op in [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Pow(0.1 / 0.1 * 2.5)] {
        check_gradients(&[(pos.clone(), shape.clone())], Tolerance::default(), |t| {
            weighted_sum(&caml_wgpu::ops::elementwise::unary(op, &t[0]), 4)
        });
    }
}

#[test]
fn reduction_grads_match_finite_differences() {
    let x = data(30, &[3, 4, 5], -1.0, 1.0);
    for axes in [vec![0], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
        check_gradients(&[x.clone()], Tolerance::default(), |t| weighted_sum(&t[0].sum(&axes, true), 5));
        check_gradients(&[x.clone()], Tolerance::default(), |t| weighted_sum(&t[0].mean(&axes, false), 6));
    }
    // Max needs entries further apart than the difference step: a shuffled ladder 0.05 apart.
    let mut rng = Rng::new(31);
    let mut ladder: Vec<f32> = (0..60).map(|i| i as f32 * 0.05 - 1.5).collect();
    for i in (1..60).rev() {
        ladder.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for axis in 0..3 {
        check_gradients(&[(ladder.clone(), vec![3, 4, 5])], Tolerance::default(), |t| {
            weighted_sum(&t[0].max_axis(axis), 7)
        });
        check_gradients(&[x.clone()], Tolerance::default(), |t| weighted_sum(&t[0].softmax(axis), 8));
        check_gradients(&[x.clone()], Tolerance::default(), |t| weighted_sum(&t[0].log_softmax(axis), 9));
    }
}

#[test]
fn matmul_grads_match_finite_differences() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = data(40, if ta { &[2, 4, 3] } else { &[2, 3, 4] }, -1.0, 1.0);
        let b = data(41, if tb { &[2, 5, 4] } else { &[2, 4, 5] }, -1.0, 1.0);
        check_gradients(&[a, b], Tolerance::default(), |t| {
            weighted_sum(&matmul::matmul_t(&t[0], &t[1], ta, tb), 10)
        });
    }
    // Multiples of 4 take the 16-byte-load kernel, forward and backward.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = data(44, if ta { &[2, 8, 4] } else { &[2, 4, 8] }, -1.0, 1.0);
        let b = data(45, &[2, 8, 8], -1.0, 1.0);
        check_gradients(&[a, b], Tolerance::default(), |t| {
            weighted_sum(&matmul::matmul_t(&t[0], &t[1], ta, tb), 15)
        });
    }
    // Shared right operand: its gradient sums over the batch.
    let a = data(42, &[3, 2, 4], -1.0, 1.0);
    let w = data(43, &[4, 5], -1.0, 1.0);
    check_gradients(&[a, w], Tolerance::default(), |t| weighted_sum(&t[0].matmul(&t[1]), 11));
}

#[test]
fn layout_grads_match_finite_differences() {
    let x = data(50, &[2, 3, 4], -1.0, 1.0);
    let y = data(51, &[2, 2, 4], -1.0, 1.0);
    check_gradients(&[x.clone()], Tolerance::default(), |t| weighted_sum(&t[0].permute(&[2, 0, 1]), 12));
    check_gradients(&[x.clone()], Tolerance::default(), |t| {
        weighted_sum(&t[0].reshape(&[6, 4]).narrow(0, 1, 3), 13)
    });
    check_gradients(&[x.clone(), y], Tolerance::default(), |t| {
        weighted_sum(&Tensor::concat(&[t[0].clone(), t[1].clone()], 1), 14)
    });
    let idx = Tensor::from_u32(&[3, 0, 3, 5, 3], &[5]);
    check_gradients(&[x], Tolerance::default(), |t| {
        weighted_sum(&t[0].reshape(&[6, 4]).gather_rows(&idx), 15)
    });
}

#[test]
fn composed_expressions_accumulate_gradients() {
    // x feeds several ops; gradients from every use add up.
    let x = data(60, &[3, 5], -1.0, 1.0);
    check_gradients(&[x.clone()], Tolerance::default(), |t| {
        let x = &t[0];
        x.mul(x).add(&x.exp()).sub(&x.softmax(1).mul(x)).sum_all()
    });
    let w = data(61, &[5, 4], -1.0, 1.0);
    check_gradients(&[x, w], Tolerance::default(), |t| {
        let h = t[0].matmul(&t[1]).relu();
        let l = h.log_softmax(1).mul(&h.sum(&[1], true)).mean_all();
        l.add(&t[1].powf(2.0).sum_all().mul_scalar(0.1))
    });
}

#[test]
fn detach_and_no_grad_stop_gradients() {
    let x = Tensor::variable(&[1.0, 2.0, 3.0], &[3]);
    let y = x.mul(&x.detach()).sum_all();
    let g = backward(&y);
    assert_eq!(g.get(&x).unwrap().to_vec(), vec![1.0, 2.0, 3.0]);
    let z = caml_wgpu::no_grad(|| x.mul(&x));
    assert!(!z.tracks_grad());
}

#[test]
fn top_indices_match_a_stable_descending_sort() {
    use caml_wgpu::ops::sort;
    for (n, len) in [(1usize, 1usize), (7, 3), (1000, 1000), (5000, 1280)] {
        let mut rng = Rng::new(70 + n as u64);
        // Few distinct values, so that ties are common and their order is checked.
        let keys: Vec<f32> = (0..n).map(|_| (rng.below(17) as f32) * 0.03 + 0.5).collect();
        let got = sort::top_indices(&Tensor::from_vec(&keys, &[n]), len);
        assert_eq!(got.shape(), &[len]);
        assert_eq!(got.to_u32(), sort::top_indices_cpu(&keys, len), "n = {n}");
    }
}

#[test]
fn top_set_holds_the_first_of_a_stable_descending_sort() {
    use caml_wgpu::ops::sort;
    let want = |keys: &[f32], len: usize| {
        let mut v = sort::top_indices_cpu(keys, len);
        v.sort_unstable();
        v
    };
    for (n, len) in [(1usize, 1usize), (7, 3), (1000, 1000), (5000, 1280), (70_000, 1600), (300, 0)] {
        let mut rng = Rng::new(80 + n as u64);
        // Few distinct values, so that the k-th largest key is tied and the ties are taken by
        // position; some keys negative and zero, so that the float order of the bits is checked.
        let keys: Vec<f32> = (0..n).map(|_| (rng.below(17) as f32 - 5.0) * 0.03).collect();
        let got = sort::top_set(&Tensor::from_vec(&keys, &[n]), len, 0);
        assert_eq!(got.shape(), &[len]);
        assert_eq!(got.to_u32(), want(&keys, len), "n = {n}, len = {len}");
    }
    // Distinct keys of every magnitude: each of the four bytes decides somewhere.
    let mut rng = Rng::new(90);
    let keys: Vec<f32> =
        (0..20_000).map(|_| ((rng.uniform() - 0.5) as f32) * 10f32.powi(rng.below(9) as i32 - 4)).collect();
    for len in [1, 2, 777, 19_999, 20_000] {
        let got = sort::top_set(&Tensor::from_vec(&keys, &[keys.len()]), len, 3 * keys.len());
        assert_eq!(got.to_u32(), want(&keys, len), "len = {len}");
    }
}

#[test]
fn nonzero_many_compacts_each_mask() {
    let a = Tensor::from_vec(&[0.0, 1.0, 1.0, 0.0, 1.0], &[5]);
    let b = Tensor::from_vec(&[1.0, 0.0, 0.0], &[3]);
    let got = scan::nonzero_many(&[&a, &b, &Tensor::zeros(&[0])]);
    assert_eq!(got[0].to_u32(), vec![1, 2, 4]);
    assert_eq!(got[1].to_u32(), vec![0]);
    assert_eq!(got[2].shape(), &[0]);
}

#[test]
fn u32_vectors_concatenate_and_gather_bit_exactly() {
    let a = Tensor::from_u32(&[1, 5, 3_000_000_000], &[3]);
    let b = Tensor::from_u32(&[7], &[1]);
    let c = Tensor::concat_u32(&[&a, &Tensor::from_u32(&[], &[0]), &b]);
    assert_eq!(c.to_u32(), vec![1, 5, 3_000_000_000, 7]);
    assert_eq!(c.gather_rows(&Tensor::from_u32(&[3, 0, 2], &[3])).to_u32(), vec![7, 1, 3_000_000_000]);
}

#[test]
fn broadcast_axes_collapse_where_both_operands_are_contiguous() {
    use caml_wgpu::ops::elementwise::{broadcast_strides, collapse};
    // A channel bias over N, C, X, Y, Z: three runs (N | C | X Y Z).
    let shape = [2, 3, 4, 5, 6];
    let (d, a, b) =
        collapse(&shape, &broadcast_strides(&shape, &shape), &broadcast_strides(&[1, 3, 1, 1, 1], &shape));
    assert_eq!(d, vec![2, 3, 120]);
    assert_eq!(a, vec![360, 120, 1]);
    assert_eq!(b, vec![0, 1, 0]);
    // A row bias over [rows, cols]: two runs.
    let (d, _, b) = collapse(&[7, 9], &[9, 1], &broadcast_strides(&[9], &[7, 9]));
    assert_eq!((d, b), (vec![7, 9], vec![0, 1]));
}

#[test]
fn voxel_rows_gathered_across_channels_match_the_composed_copies() {
    // Rows of an N, C, X, Y, Z tensor with channels last at voxels of the samples from n0 on,
    // against narrow + permute + reshape + gather_rows: values and the gradient; also under a
    // binding limit the tensor exceeds (the composed fallback).
    use caml_wgpu::autograd::backward;
    use caml_wgpu::ops::layout::gather_voxel_rows;
    let shape = [4, 3, 5, 6, 7];
    let (x, _) = data(30, &shape, -1.0, 1.0);
    let v = 5 * 6 * 7;
    let index: Vec<u32> = (0..2 * v as u32).filter(|i| i % 7 != 3).rev().step_by(3).collect();
    let run = |fused: bool| {
        let xt = Tensor::variable(&x, &shape);
        let idx = Tensor::from_u32(&index, &[index.len()]);
        let y = if fused {
            gather_voxel_rows(&xt, 2, &idx)
        } else {
            xt.narrow(0, 2, 2).permute(&[0, 2, 3, 4, 1]).reshape(&[2 * v, 3]).gather_rows(&idx)
        };
        let w = Tensor::from_vec(&data(31, &[index.len(), 3], -1.0, 1.0).0, &[index.len(), 3]);
        let g = backward(&y.mul(&w).sum_all());
        (y.to_vec(), g.get(&xt).unwrap().to_vec())
    };
    let (want_y, want_g) = run(false);
    assert_eq!(want_y.len(), index.len() * 3);
    for small in [false, true] {
        let (y, g) = if small { caml_wgpu::ops::with_binding_limit(1024, || run(true)) } else { run(true) };
        close(&y, &want_y, 0.0);
        close(&g, &want_g, 0.0);
    }
}

/// A software device flushes denormal f32 values to zero, read or computed, as GPUs may: on x86
/// its arithmetic on them would cost about thirty times that on normal values. (A GPU keeps or
/// flushes them as its driver does: nothing to check there.)
#[test]
#[cfg(target_arch = "x86_64")]
fn a_software_device_flushes_denormals() {
    if !caml_wgpu::gpu::gpu().is_software() {
        return;
    }
    let x = Tensor::from_vec(&[1e-39, 3.0, -2e-40, 1e-30], &[4]);
    assert_eq!(x.mul_scalar(2.0).to_vec(), [0.0, 6.0, 0.0, 2e-30], "denormal inputs read as zero");
    assert_eq!(x.mul_scalar(1e-9).to_vec(), [0.0, 3.0 * 1e-9, 0.0, 0.0], "denormal results are zero");
}

#[test]
fn a_rehearsal_takes_buffers_but_changes_nothing_on_the_device() {
    use caml_wgpu::gpu::{gpu, rehearsing};
    let g = gpu();
    let t = Tensor::from_vec(&[1.0, 2.0, 3.0], &[3]);
    let mask = Tensor::from_vec(&[0.0, 1.0, 0.0, 0.0, 1.0], &[5]);
    let found = g.rehearse(|| {
        assert!(rehearsing());
        // A launch, a copy and an upload into t: none of them is recorded.
        let doubled = t.mul_scalar(2.0);
        g.copy(doubled.buffer(), 0, t.buffer(), 0, 12);
        g.upload(t.buffer(), 0, bytemuck::cast_slice(&[9.0f32; 3]));
        // Nothing can be read back; a selection counts every entry.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doubled.to_vec()));
        assert!(read.is_err(), "a rehearsal read a buffer back");
        let found = scan::nonzero(&mask).numel();
        // Work done for real inside it runs.
        let real =
            g.for_real(|| (rehearsing(), Tensor::from_vec(&[1.0, 2.0], &[2]).mul_scalar(3.0).to_vec()));
        assert_eq!(real, (false, vec![3.0, 6.0]));
        assert!(rehearsing());
        found
    });
    assert!(!rehearsing());
    assert_eq!(found, 5);
    assert_eq!(t.to_vec(), [1.0, 2.0, 3.0]);
    assert_eq!(scan::nonzero(&mask).to_u32(), [1, 4]);
}

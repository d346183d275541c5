//! conv3d and conv_transpose3d against the CPU reference (every kernel the adapter can run, odd
//! sizes, strides, borders, batches, channel counts off the tile sizes) and their gradients
//! against finite differences.

use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::conv::{self, Algo, Form, cpu};
use caml_wgpu::{Tensor, no_grad};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: entry {i}: got {g}, want {w}");
    }
}

/// Uploads of (data, shape) pairs.
fn tensors<const N: usize>(parts: [(&[f32], &[usize]); N]) -> [Tensor; N] {
    parts.map(|(v, shape)| Tensor::from_vec(v, shape))
}

fn rand(seed: u64, shape: &[usize]) -> Vec<f32> {
    Rng::new(seed).vec(shape.iter().product(), -1.0, 1.0)
}

/// A conv3d test layer: batch, channels, input dims, kernel, stride, padding.
struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    d: [usize; 3],
    k: usize,
    s: usize,
    p: usize,
}

const fn case(n: usize, cin: usize, cout: usize, d: [usize; 3], k: usize, s: usize, p: usize) -> Case {
    Case { n, cin, cout, d, k, s, p }
}

const CASES: &[Case] = &[
    case(2, 3, 5, [7, 5, 9], 3, 1, 1),
    case(1, 4, 9, [7, 6, 11], 3, 2, 1),
    case(2, 5, 3, [8, 7, 9], 2, 2, 0),
    case(1, 6, 17, [5, 4, 13], 1, 1, 0),
    case(1, 3, 4, [6, 5, 7], 2, 1, 1),
    case(1, 2, 3, [5, 5, 6], 3, 1, 0),
    case(1, 3, 4, [7, 6, 5], 1, 2, 0),
    case(1, 1, 4, [9, 3, 18], 3, 1, 1),
    case(1, 3, 4, [6, 9, 17], 2, 2, 0),
    // Rows along z that are whole vec4s, over more than one step of 16 with a tail.
    case(2, 3, 5, [4, 5, 40], 2, 2, 0),
    // Same convolutions with rows of whole vectors: over several tiles along z with a tail
    // (halo vectors from the neighbouring tiles), within one tile, tiles of several rows along y
    // (1, 2 or 4 lanes along z, rows past the end, a lane past a row's end), and a 1x1x1 kernel.
    case(2, 3, 5, [4, 5, 40], 3, 1, 1),
    case(1, 5, 6, [3, 6, 16], 3, 1, 1),
    case(2, 4, 8, [3, 5, 8], 3, 1, 1),
    case(1, 3, 4, [2, 7, 4], 3, 1, 1),
    case(1, 3, 4, [2, 7, 12], 3, 1, 1),
    case(1, 6, 9, [3, 4, 24], 1, 1, 0),
];

#[test]
fn conv3d_forward_and_input_grad_match_cpu_for_every_algo() {
    for (ci, &Case { n, cin, cout, d, k, s, p }) in CASES.iter().enumerate() {
        let xs = [n, cin, d[0], d[1], d[2]];
        let ws = [cout, cin, k, k, k];
        let (x, w, b) = (rand(ci as u64, &xs), rand(100 + ci as u64, &ws), rand(200 + ci as u64, &[cout]));
        let (want, ys) = cpu::conv3d(&x, xs, &w, ws, &b, s, p);
        let dy = rand(300 + ci as u64, &ys);
        let (want_dx, _, _) = cpu::conv3d_backward(&x, xs, &w, ws, &dy, s, p);
        let (tx, tw, tb) =
            (Tensor::from_vec(&x, &xs), Tensor::from_vec(&w, &ws), Tensor::from_vec(&b, &[cout]));
        let tdy = Tensor::from_vec(&dy, &ys);
        for algo in conv::algos(Form::Gather, k) {
            let what = format!("case {ci} {algo:?}");
            conv::with_algo(Form::Gather, algo, || {
                let y = conv::conv3d(&tx, &tw, &tb, s, p);
                assert_eq!(y.shape(), &ys[..]);
                close(&y.to_vec(), &want, 1e-4, &format!("forward {what}"));
                let dx = conv::conv3d_input_grad(&tdy, &tw, &xs, s, p);
                close(&dx.to_vec(), &want_dx, 1e-4, &format!("input grad {what}"));
            });
        }
        if (k, s, p) == (2, 2, 0) {
            for algo in conv::algos(Form::Up, 1) {
                conv::with_algo(Form::Up, algo, || {
                    let dx = conv::conv3d_input_grad(&tdy, &tw, &xs, s, p);
                    close(&dx.to_vec(), &want_dx, 1e-4, &format!("input grad case {ci} {algo:?}"));
                });
            }
        }
    }
}

#[test]
fn conv3d_weight_and_bias_grads_match_cpu_for_every_algo() {
    for (ci, &Case { n, cin, cout, d, k, s, p }) in CASES.iter().enumerate() {
        let xs = [n, cin, d[0], d[1], d[2]];
        let ws = [cout, cin, k, k, k];
        let (x, w) = (rand(ci as u64, &xs), rand(100 + ci as u64, &ws));
        let ys = conv::conv_out_shape(xs, cout, k, s, p);
        let dy = rand(300 + ci as u64, &ys);
        let (_, want_dw, want_db) = cpu::conv3d_backward(&x, xs, &w, ws, &dy, s, p);
        let (tx, tdy) = (Tensor::from_vec(&x, &xs), Tensor::from_vec(&dy, &ys));
        for algo in conv::algos(Form::Wgrad, k) {
            conv::with_algo(Form::Wgrad, algo, || {
                let dw = conv::conv3d_weight_grad(&tdy, &tx, k, s, p);
                assert_eq!(dw.shape(), &ws[..]);
                close(&dw.to_vec(), &want_dw, 1e-4, &format!("weight grad case {ci} {algo:?}"));
            });
        }
        // Through autograd (autotuned kernels), all three gradients at once.
        let (vx, vw, vb) = (
            Tensor::variable(&x, &xs),
            Tensor::variable(&w, &ws),
            Tensor::variable(&vec![0.5; cout], &[cout]),
        );
        let y = vx.conv3d(&vw, &vb, s, p);
        let grads = caml_wgpu::backward(&y.mul(&tdy).sum_all());
        close(&grads.get(&vb).unwrap().to_vec(), &want_db, 1e-4, &format!("bias grad case {ci}"));
        close(&grads.get(&vw).unwrap().to_vec(), &want_dw, 1e-4, &format!("autograd weight grad case {ci}"));
        let (want_dx, _, _) = cpu::conv3d_backward(&x, xs, &w, ws, &dy, s, p);
        close(&grads.get(&vx).unwrap().to_vec(), &want_dx, 1e-4, &format!("autograd input grad case {ci}"));
    }
}

/// (batch, cin, cout, [X, Y, Z])
/// (batch, cin, cout, [X, Y, Z]); the last two have rows along z of whole vectors, over more than
/// one tile of vector kernels with a tail.
const TCASES: &[(usize, usize, usize, [usize; 3])] = &[
    (2, 5, 3, [3, 4, 5]),
    (1, 9, 17, [2, 3, 3]),
    (1, 1, 2, [4, 1, 7]),
    (1, 3, 5, [3, 5, 9]),
    (2, 3, 5, [2, 3, 20]),
    (1, 17, 9, [3, 2, 36]),
];

#[test]
fn conv_transpose3d_matches_cpu_for_every_algo() {
    for (ci, &(n, cin, cout, d)) in TCASES.iter().enumerate() {
        let xs = [n, cin, d[0], d[1], d[2]];
        let ws = [cin, cout, 2, 2, 2];
        let (x, w, b) = (rand(ci as u64, &xs), rand(100 + ci as u64, &ws), rand(200 + ci as u64, &[cout]));
        let (want, ys) = cpu::conv_transpose3d(&x, xs, &w, ws, &b);
        let dy = rand(300 + ci as u64, &ys);
        let (want_dx, want_dw, want_db) = cpu::conv_transpose3d_backward(&x, xs, &w, ws, &dy);
        let (tx, tw, tb) =
            (Tensor::from_vec(&x, &xs), Tensor::from_vec(&w, &ws), Tensor::from_vec(&b, &[cout]));
        let tdy = Tensor::from_vec(&dy, &ys);
        for algo in conv::algos(Form::Up, 1) {
            conv::with_algo(Form::Up, algo, || {
                let y = conv::conv_transpose3d(&tx, &tw, &tb);
                assert_eq!(y.shape(), &ys[..]);
                close(&y.to_vec(), &want, 1e-4, &format!("forward case {ci} {algo:?}"));
            });
        }
        for algo in conv::algos(Form::Gather, 2) {
            conv::with_algo(Form::Gather, algo, || {
                let dx = conv::conv_transpose3d_input_grad(&tdy, &tw, &xs);
                close(&dx.to_vec(), &want_dx, 1e-4, &format!("input grad case {ci} {algo:?}"));
            });
        }
        for algo in conv::algos(Form::Wgrad, 2) {
            conv::with_algo(Form::Wgrad, algo, || {
                let dw = conv::conv_transpose3d_weight_grad(&tdy, &tx);
                close(&dw.to_vec(), &want_dw, 1e-4, &format!("weight grad case {ci} {algo:?}"));
            });
        }
        let db = tdy.sum(&[0, 2, 3, 4], false);
        close(&db.to_vec(), &want_db, 1e-4, "bias grad");
    }
}

#[test]
fn convolutions_bind_one_sample_at_a_time_past_the_binding_limit() {
    // Samples of 3 * 5 * 4 * 7 floats start at offsets that are not multiples of the alignment.
    let (xs, ws) = ([3, 3, 5, 4, 7], [4, 3, 3, 3, 3]);
    let (x, w, b) = (rand(1, &xs), rand(2, &ws), rand(3, &[4]));
    let (want, ys) = cpu::conv3d(&x, xs, &w, ws, &b, 1, 1);
    let dy = rand(4, &ys);
    let (want_dx, want_dw, _) = cpu::conv3d_backward(&x, xs, &w, ws, &dy, 1, 1);
    let [tx, tw, tb, tdy] = tensors([(&x, &xs), (&w, &ws), (&b, &[4]), (&dy, &ys)]);
    conv::with_binding_limit(2400, || {
        close(&conv::conv3d(&tx, &tw, &tb, 1, 1).to_vec(), &want, 1e-4, "forward");
        close(&conv::conv3d_input_grad(&tdy, &tw, &xs, 1, 1).to_vec(), &want_dx, 1e-4, "input grad");
        close(&conv::conv3d_weight_grad(&tdy, &tx, 3, 1, 1).to_vec(), &want_dw, 1e-4, "weight grad");
    });
}

#[test]
fn vector_tiles_bind_one_sample_at_a_time_past_the_binding_limit() {
    // Rows along z of whole vec4s; samples of the input (96 bytes) and of the output (1152
    // bytes) start off the 256-byte binding alignment, so bindings begin vectors before them.
    let (xs, ws) = ([3, 2, 1, 3, 4], [2, 3, 2, 2, 2]);
    let (x, w, b) = (rand(1, &xs), rand(2, &ws), rand(3, &[3]));
    let (want, ys) = cpu::conv_transpose3d(&x, xs, &w, ws, &b);
    let dy = rand(4, &ys);
    let (want_dx, want_dw, _) = cpu::conv_transpose3d_backward(&x, xs, &w, ws, &dy);
    let [tx, tw, tb, tdy] = tensors([(&x, &xs), (&w, &ws), (&b, &[3]), (&dy, &ys)]);
    conv::with_binding_limit(1500, || {
        for algo in conv::algos(Form::Up, 1) {
            let y = conv::with_algo(Form::Up, algo, || conv::conv_transpose3d(&tx, &tw, &tb));
            close(&y.to_vec(), &want, 1e-4, &format!("forward {algo}"));
        }
        for algo in conv::algos(Form::Gather, 2) {
            let dx =
                conv::with_algo(Form::Gather, algo, || conv::conv_transpose3d_input_grad(&tdy, &tw, &xs));
            close(&dx.to_vec(), &want_dx, 1e-4, &format!("input grad {algo}"));
        }
        for algo in conv::algos(Form::Wgrad, 2) {
            let dw = conv::with_algo(Form::Wgrad, algo, || conv::conv_transpose3d_weight_grad(&tdy, &tx));
            close(&dw.to_vec(), &want_dw, 1e-4, &format!("weight grad {algo}"));
        }
    });
}

#[test]
#[should_panic(expected = "over this adapter's storage binding limit")]
fn a_sample_over_the_binding_limit_is_reported() {
    let x = Tensor::zeros(&[2, 4, 8, 8, 8]);
    let (w, b) = (Tensor::zeros(&[2, 4, 3, 3, 3]), Tensor::zeros(&[2]));
    conv::with_binding_limit(4096, || no_grad(|| conv::conv3d(&x, &w, &b, 1, 1).to_vec()));
}

fn gradcheck_conv(xs: [usize; 5], ws: [usize; 5], s: usize, p: usize) {
    let inputs =
        vec![(rand(1, &xs), xs.to_vec()), (rand(2, &ws), ws.to_vec()), (rand(3, &[ws[0]]), vec![ws[0]])];
    check_gradients(&inputs, Tolerance::default(), |t| weighted_sum(&t[0].conv3d(&t[1], &t[2], s, p), 7));
}

#[test]
fn conv3d_grad_matches_finite_differences() {
    gradcheck_conv([1, 2, 3, 4, 5], [3, 2, 3, 3, 3], 1, 1);
    gradcheck_conv([2, 2, 4, 4, 5], [3, 2, 2, 2, 2], 2, 0);
    gradcheck_conv([1, 3, 2, 3, 3], [2, 3, 1, 1, 1], 1, 0);
    // Rows of whole vec4s through the vector tiles of the same convolution, forward and input
    // gradient, where the adapter has them.
    for algo in conv::algos(Form::Gather, 3).into_iter().filter(|a| matches!(a, Algo::Subgroup { z: 4, .. }))
    {
        conv::with_algo(Form::Gather, algo, || gradcheck_conv([1, 2, 3, 3, 8], [3, 2, 3, 3, 3], 1, 1));
    }
}

#[test]
fn conv_transpose3d_grad_matches_finite_differences() {
    let (xs, ws) = ([2, 3, 2, 2, 3], [3, 2, 2, 2, 2]);
    let inputs = vec![(rand(1, &xs), xs.to_vec()), (rand(2, &ws), ws.to_vec()), (rand(3, &[2]), vec![2])];
    check_gradients(&inputs, Tolerance::default(), |t| weighted_sum(&t[0].conv_transpose3d(&t[1], &t[2]), 7));
}

#[test]
fn algorithms_read_back_as_written() {
    for form in [Form::Gather, Form::Up, Form::Wgrad] {
        for algo in conv::algos(form, 3).into_iter().chain(conv::algos(form, 2)) {
            assert_eq!(algo.to_string().parse::<Algo>(), Ok(algo));
        }
    }
    assert!("subgroup 8 8".parse::<Algo>().is_err());
}

#[test]
fn algos_cover_both_families() {
    let g = conv::algos(Form::Gather, 3);
    assert!(g.iter().any(|a| matches!(a, Algo::Tiled { .. })));
    assert_eq!(conv::subgroups_usable(), g.iter().any(|a| matches!(a, Algo::Subgroup { .. })));
}

/// A convolution that feeds a BatchNorm in training mode: the loss does not depend on its bias
/// (finite differences of it vanish), the summed bias gradient is rounding noise, and the
/// `_before_batchnorm` forms give it as zero with the other gradients unchanged.
#[test]
fn a_bias_before_training_batchnorm_gets_a_zero_gradient() {
    use caml_wgpu::nn::batchnorm::BatchNorm;
    let xs = [2, 3, 6, 5, 4];
    let x = rand(61, &xs);
    for transposed in [false, true] {
        let ws: [usize; 5] = if transposed { [3, 4, 2, 2, 2] } else { [4, 3, 3, 3, 3] };
        let (w, b) = (rand(62, &ws), rand(63, &[4]));
        let bn = BatchNorm::new(4);
        let f = |t: &[Tensor], cancel: bool| {
            let y = match (transposed, cancel) {
                (false, false) => conv::conv3d(&t[0], &t[1], &t[2], 1, 1),
                (false, true) => conv::conv3d_before_batchnorm(&t[0], &t[1], &t[2], 1, 1),
                (true, false) => conv::conv_transpose3d(&t[0], &t[1], &t[2]),
                (true, true) => conv::conv_transpose3d_before_batchnorm(&t[0], &t[1], &t[2]),
            };
            weighted_sum(&bn.forward_relu(&y, true), 64)
        };
        let grads = |cancel: bool| {
            let t = [Tensor::variable(&x, &xs), Tensor::variable(&w, &ws), Tensor::variable(&b, &[4])];
            let g = caml_wgpu::backward(&f(&t, cancel));
            t.map(|v| g.get(&v).unwrap().to_vec())
        };
        let ([dx0, dw0, db0], [dx1, dw1, db1]) = (grads(false), grads(true));
        close(&dx1, &dx0, 1e-6, "dx");
        close(&dw1, &dw0, 1e-6, "dw");
        let scale = dw0.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            db0.iter().all(|v| v.abs() <= 1e-5 * scale),
            "summed bias gradient {db0:?} (dw up to {scale})"
        );
        assert!(db1.iter().all(|&v| v == 0.0), "bias gradient {db1:?}");
        // The loss does not move with the bias.
        let t = [Tensor::from_vec(&x, &xs), Tensor::from_vec(&w, &ws)];
        let at = |db: f32| {
            let shifted: Vec<f32> = b.iter().map(|v| v + db).collect();
            no_grad(|| f(&[t[0].clone(), t[1].clone(), Tensor::from_vec(&shifted, &[4])], false).item())
        };
        let (l0, l1) = (at(0.0), at(0.5));
        assert!((l1 - l0).abs() <= 1e-4 * (1.0 + l0.abs()), "loss {l0} -> {l1} with the bias moved");
    }
}

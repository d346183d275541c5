//! BatchNorm (3d and 1d, with and without the fused ReLU) against the CPU reference, PyTorch's
//! running-statistics formulas, and finite differences; the per-channel reductions in the
//! workgroup sizes of GPUs (256) and of software devices (32).

use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients, weighted_sum};
use caml_wgpu::ops::batchnorm::{BatchNormState, batch_norm, cpu, with_reduction_workgroup};
use caml_wgpu::{Tensor, backward};

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what} entry {i}: got {g}, want {w}");
    }
}

/// Normal samples (Box-Muller) with the given mean and standard deviation.
fn normal(seed: u64, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - rng.uniform(), rng.uniform());
            mean + std * ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// A layer's tensors, with host copies of the running statistics for the reference.
struct Layer {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    count: Tensor,
    host: [Vec<f32>; 4],
    momentum: f32,
}

impl Layer {
    fn new(seed: u64, c: usize, momentum: f32) -> Layer {
        let mut rng = Rng::new(seed);
        let host = [rng.vec(c, 0.5, 1.5), rng.vec(c, -0.5, 0.5), rng.vec(c, -0.3, 0.3), rng.vec(c, 0.5, 2.0)];
        Layer {
            weight: Tensor::variable(&host[0], &[c]),
            bias: Tensor::variable(&host[1], &[c]),
            running_mean: Tensor::from_vec(&host[2], &[c]),
            running_var: Tensor::from_vec(&host[3], &[c]),
            count: Tensor::from_u32(&[0], &[]),
            host,
            momentum,
        }
    }
    fn state(&self) -> BatchNormState<'_> {
        BatchNormState {
            weight: &self.weight,
            bias: &self.bias,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            num_batches_tracked: &self.count,
            momentum: self.momentum,
            eps: 1e-5,
        }
    }
}

// Scalar kernels (inner not a multiple of 4): [2, 3, 5, 6, 7] (420 values per channel, one partial
// block) and [3, 2, 17, 19, 23] (22287 values, two blocks); vec4 kernels: [2, 3, 4, 5, 6] and
// [3, 2, 16, 19, 23] (20976 values, two blocks; its per-element kernels take four vec4s per
// invocation, 6992 values per sample a multiple of 16); BatchNorm1d: [37, 5] (scalar), [37, 8] and
// [4100, 12] (channels-last vec4 kernels, one and three blocks).
const SHAPES: [&[usize]; 7] = [
    &[2, 3, 5, 6, 7],
    &[3, 2, 17, 19, 23],
    &[2, 3, 4, 5, 6],
    &[3, 2, 16, 19, 23],
    &[37, 5],
    &[37, 8],
    &[4100, 12],
];

#[test]
fn batchnorm_forward_matches_cpu_in_training_and_eval() {
    each_workgroup(|| {
        for (k, &shape) in SHAPES.iter().enumerate() {
            let c = shape[1];
            let x = normal(k as u64, shape.iter().product(), 0.7, 1.3);
            let xt = Tensor::from_vec(&x, shape);
            for relu in [false, true] {
                for train in [true, false] {
                    let l = Layer::new(10 + k as u64, c, 0.1);
                    let y = batch_norm(&xt, &l.state(), train, relu);
                    let running = (&l.host[2][..], &l.host[3][..]);
                    let (want, rm, rv) =
                        cpu::forward(&x, shape, &l.host[0], &l.host[1], running, train, 0.1, 1e-5, relu);
                    let what = format!("{shape:?} train {train} relu {relu}");
                    close(&y.to_vec(), &want, 2e-5, &what);
                    close(&l.running_mean.to_vec(), &rm, 1e-6, &format!("running_mean {what}"));
                    close(&l.running_var.to_vec(), &rv, 1e-5, &format!("running_var {what}"));
                    assert_eq!(l.count.to_u32(), vec![train as u32], "num_batches_tracked {what}");
                }
            }
        }
    });
}

#[test]
fn batchnorm_running_statistics_follow_pytorch_formulas() {
    // BatchNorm1d over 4 rows of 2 features: channel 0 = 1, 2, 3, 4 and channel 1 = 2, 4, 6, 8.
    // mean (2.5, 5), biased variance (1.25, 5), unbiased (5/3, 20/3).
    let x = Tensor::from_vec(&[1.0, 2.0, 2.0, 4.0, 3.0, 6.0, 4.0, 8.0], &[4, 2]);
    let l = Layer {
        weight: Tensor::variable(&[1.0, 1.0], &[2]),
        bias: Tensor::variable(&[0.0, 0.0], &[2]),
        running_mean: Tensor::zeros(&[2]),
        running_var: Tensor::full(&[2], 1.0),
        count: Tensor::from_u32(&[0], &[]),
        host: Default::default(),
        momentum: 0.1,
    };
    let y = batch_norm(&x, &l.state(), true, false).to_vec();
    // Training normalizes with the biased variance: (1 - 2.5) / sqrt(1.25 + 1e-5).
    assert!((y[0] - (-1.5 / (1.25f32 + 1e-5).sqrt())).abs() < 1e-6, "y[0] = {}", y[0]);
    // running = 0.9 * running + 0.1 * batch, with the unbiased variance.
    let rm1 = [0.1 * 2.5, 0.1 * 5.0];
    let rv1 = [0.9 + 0.1 * 5.0 / 3.0, 0.9 + 0.1 * 20.0 / 3.0];
    close(&l.running_mean.to_vec(), &rm1, 1e-7, "running_mean after one step");
    close(&l.running_var.to_vec(), &rv1, 1e-7, "running_var after one step");
    assert_eq!(l.count.to_u32(), vec![1]);
    batch_norm(&x, &l.state(), true, false);
    let rm2 = [0.9 * rm1[0] + 0.25, 0.9 * rm1[1] + 0.5];
    let rv2 = [0.9 * rv1[0] + 0.1 * 5.0 / 3.0, 0.9 * rv1[1] + 0.1 * 20.0 / 3.0];
    close(&l.running_mean.to_vec(), &rm2, 1e-7, "running_mean after two steps");
    close(&l.running_var.to_vec(), &rv2, 1e-7, "running_var after two steps");
    assert_eq!(l.count.to_u32(), vec![2]);
    // Evaluation uses the running statistics and changes nothing.
    let e = batch_norm(&x, &l.state(), false, false).to_vec();
    let want1 = (2.0 - rm2[1]) / (rv2[1] + 1e-5f32).sqrt();
    assert!((e[1] - want1).abs() < 1e-6, "eval y[1] = {}, want {want1}", e[1]);
    close(&l.running_mean.to_vec(), &rm2, 0.0, "running_mean after eval");
    assert_eq!(l.count.to_u32(), vec![2]);
}

#[test]
fn batchnorm_variance_is_accurate_for_large_means() {
    each_workgroup(|| {
        // sum(x^2) - sum(x)^2 / M in f32 would lose the unit variance under a mean of 1000 (1000^2 * 6e-8
        // = 0.06 per term); centred moments keep it to float rounding.
        // [2, 4, 30, 30, 20] runs the vec4 kernels, [2, 3, 31, 29, 21] the scalar ones; three blocks each.
        for (mean, shape) in
            [(100.0, [2, 4, 30, 30, 20]), (1000.0, [2, 4, 30, 30, 20]), (1000.0, [2, 3, 31, 29, 21])]
        {
            let x = normal(7, shape.iter().product(), mean, 1.0);
            let l = Layer::new(3, shape[1], 1.0);
            let y = batch_norm(&Tensor::from_vec(&x, &shape), &l.state(), true, false);
            let stats = cpu::stats(&x, &shape);
            let m = (x.len() / shape[1]) as f64;
            let want_mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
            let want_var: Vec<f32> = stats.iter().map(|s| (s.1 * m / (m - 1.0)) as f32).collect();
            close(&l.running_mean.to_vec(), &want_mean, 1e-6, "batch mean");
            close(&l.running_var.to_vec(), &want_var, 1e-4, "unbiased batch variance");
            let running = (&l.host[2][..], &l.host[3][..]);
            let (want, _, _) =
                cpu::forward(&x, &shape, &l.host[0], &l.host[1], running, true, 1.0, 1e-5, false);
            close(&y.to_vec(), &want, 2e-4, "normalized output");
        }
    });
}

#[test]
fn batchnorm_grads_match_cpu() {
    each_workgroup(|| {
        for (k, &shape) in SHAPES.iter().enumerate() {
            let n: usize = shape.iter().product();
            let x = normal(20 + k as u64, n, -0.3, 1.1);
            let dy = Rng::new(30 + k as u64).vec(n, -1.0, 1.0);
            for relu in [false, true] {
                for train in [true, false] {
                    let l = Layer::new(40 + k as u64, shape[1], 0.1);
                    let xv = Tensor::variable(&x, shape);
                    let y = batch_norm(&xv, &l.state(), train, relu);
                    let g = backward(&y.mul(&Tensor::from_vec(&dy, shape)).sum_all());
                    let running = (&l.host[2][..], &l.host[3][..]);
                    let (dx, dw, db) =
                        cpu::backward(&x, shape, &l.host[0], &l.host[1], running, &dy, train, 1e-5, relu);
                    let what = format!("{shape:?} train {train} relu {relu}");
                    close(&g.get(&xv).unwrap().to_vec(), &dx, 1e-4, &format!("dx {what}"));
                    close(&g.get(&l.weight).unwrap().to_vec(), &dw, 1e-4, &format!("dweight {what}"));
                    close(&g.get(&l.bias).unwrap().to_vec(), &db, 1e-4, &format!("dbias {what}"));
                }
            }
        }
    });
}

/// Runs `f` with the reductions in each workgroup size that an adapter takes.
fn each_workgroup(f: impl Fn()) {
    for invocations in [256, 32] {
        with_reduction_workgroup(invocations, &f);
    }
}

/// A state whose running statistics do not move (momentum 0), for finite differences.
fn fixed_state<'a>(
    weight: &'a Tensor,
    bias: &'a Tensor,
    [rm, rv, count]: [&'a Tensor; 3],
) -> BatchNormState<'a> {
    BatchNormState {
        weight,
        bias,
        running_mean: rm,
        running_var: rv,
        num_batches_tracked: count,
        momentum: 0.0,
        eps: 1e-5,
    }
}

#[test]
fn batchnorm_grads_match_finite_differences() {
    each_workgroup(|| {
        for shape in [vec![2, 3, 2, 2, 3], vec![6, 3], vec![5, 4]] {
            let n: usize = shape.iter().product();
            let c = shape[1];
            let x = (normal(50, n, 0.2, 1.0), shape.clone());
            let w = (Rng::new(51).vec(c, 0.5, 1.5), vec![c]);
            let b = (Rng::new(52).vec(c, -0.5, 0.5), vec![c]);
            for train in [true, false] {
                let rm = Tensor::from_vec(&[0.1, -0.2, 0.3, 0.05][..c], &[c]);
                let rv = Tensor::from_vec(&[0.8, 1.2, 1.5, 0.9][..c], &[c]);
                let count = Tensor::from_u32(&[0], &[]);
                check_gradients(&[x.clone(), w.clone(), b.clone()], Tolerance::default(), |t| {
                    let s = fixed_state(&t[1], &t[2], [&rm, &rv, &count]);
                    weighted_sum(&batch_norm(&t[0], &s, train, false), 53)
                });
            }
        }
    });
}

#[test]
fn fused_batchnorm_relu_matches_composed() {
    let shape = [2, 3, 9, 8, 7];
    let n: usize = shape.iter().product();
    let x = normal(60, n, 0.1, 1.0);
    let dy = Rng::new(61).vec(n, -1.0, 1.0);
    for train in [true, false] {
        let run = |fused: bool| {
            let l = Layer::new(62, 3, 0.1);
            let xv = Tensor::variable(&x, &shape);
            let y = if fused {
                batch_norm(&xv, &l.state(), train, true)
            } else {
                batch_norm(&xv, &l.state(), train, false).relu()
            };
            let g = backward(&y.mul(&Tensor::from_vec(&dy, &shape)).sum_all());
            let grads = [&xv, &l.weight, &l.bias].map(|t| g.get(t).unwrap().to_vec());
            (y.to_vec(), grads, l.running_var.to_vec())
        };
        let (fused, composed) = (run(true), run(false));
        close(&fused.0, &composed.0, 1e-6, "output");
        for (k, what) in ["dx", "dweight", "dbias"].iter().enumerate() {
            close(&fused.1[k], &composed.1[k], 1e-5, what);
        }
        close(&fused.2, &composed.2, 0.0, "running_var");
    }
}

#[test]
fn batchnorm_splits_tensors_larger_than_one_storage_binding() {
    // The network's first BatchNorm at batch 3: 192 MB, over a 128 MiB binding limit (software
    // devices), so runs of samples are bound separately. The backward is called directly: the
    // composed loss of the other tests would bind the whole tensor at once.
    let shape = [3, 16, 112, 112, 80];
    let n: usize = shape.iter().product();
    let x = normal(70, n, 0.5, 2.0);
    let l = Layer::new(71, 16, 0.1);
    let xt = Tensor::from_vec(&x, &shape);
    let y = batch_norm(&xt, &l.state(), true, true);
    let running = (&l.host[2][..], &l.host[3][..]);
    let (want, rm, rv) = cpu::forward(&x, &shape, &l.host[0], &l.host[1], running, true, 0.1, 1e-5, true);
    close(&y.to_vec(), &want, 1e-4, "forward");
    close(&l.running_mean.to_vec(), &rm, 1e-6, "running_mean");
    close(&l.running_var.to_vec(), &rv, 1e-5, "running_var");
    drop((y, want));
    // Evaluation-mode statistics (mean, invstd, weight * invstd, bias) from the running values.
    let stats: Vec<f32> = (0..16)
        .flat_map(|c| {
            let invstd = 1.0 / (l.host[3][c] + 1e-5).sqrt();
            [l.host[2][c], invstd, l.host[0][c] * invstd, l.host[1][c]]
        })
        .collect();
    let dy = Rng::new(72).vec(n, -1.0, 1.0);
    let [dx, dw, db] = caml_wgpu::ops::batchnorm::batch_norm_grad(
        &xt,
        &l.weight,
        &Tensor::from_vec(&stats, &[16, 4]),
        &Tensor::from_vec(&dy, &shape),
        false,
        true,
    );
    let (want_dx, want_dw, want_db) =
        cpu::backward(&x, &shape, &l.host[0], &l.host[1], running, &dy, false, 1e-5, true);
    close(&dx.to_vec(), &want_dx, 1e-4, "dx");
    close(&dw.to_vec(), &want_dw, 1e-3, "dweight");
    close(&db.to_vec(), &want_db, 1e-3, "dbias");
}

/// Running statistics moved from a batch's mean and variance given without its rows: as the
/// CPU reference's training-mode forward over those rows moves them (unbiased variance for
/// running_var), and the counter by one.
#[test]
fn running_statistics_from_given_moments_match_cpu() {
    use caml_wgpu::ops::batchnorm::update_running_stats;
    let (rows, c) = (37, 8);
    let x = normal(70, rows * c, 0.4, 1.3);
    let layer = Layer::new(71, c, 0.1);
    let mut mean = vec![0f32; c];
    let mut var = vec![0f32; c];
    for j in 0..c {
        let col: Vec<f64> = (0..rows).map(|r| x[r * c + j] as f64).collect();
        let m = col.iter().sum::<f64>() / rows as f64;
        mean[j] = m as f32;
        var[j] = (col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / rows as f64) as f32;
    }
    for step in 1..=2u32 {
        update_running_stats(
            &layer.state(),
            &Tensor::from_vec(&mean, &[c]),
            &Tensor::from_vec(&var, &[c]),
            rows,
        );
        assert_eq!(layer.count.to_u32(), vec![step]);
    }
    let h = &layer.host;
    let (mut rm, mut rv) = (h[2].clone(), h[3].clone());
    for _ in 0..2 {
        let (_, m, v) = cpu::forward(&x, &[rows, c], &h[0], &h[1], (&rm, &rv), true, 0.1, 1e-5, false);
        (rm, rv) = (m, v);
    }
    close(&layer.running_mean.to_vec(), &rm, 1e-5, "running mean");
    close(&layer.running_var.to_vec(), &rv, 1e-5, "running var");
}

/// More blocks per channel than the one-invocation-per-channel finalize takes on any adapter
/// (258 of 16384 elements): the workgroup reduction of the statistics and of the gradient sums,
/// against the CPU. (The other tests' shapes have few blocks, which take the loop.)
#[test]
fn batchnorm_with_many_blocks_per_channel_matches_cpu() {
    each_workgroup(|| {
        let shape: &[usize] = &[2, 1, 2_105_345];
        let n: usize = shape.iter().product();
        let x = normal(80, n, 0.5, 1.2);
        let dy = Rng::new(81).vec(n, -1.0, 1.0);
        let l = Layer::new(82, 1, 0.1);
        let xv = Tensor::variable(&x, shape);
        let y = batch_norm(&xv, &l.state(), true, true);
        let running = (&l.host[2][..], &l.host[3][..]);
        let (want, rm, rv) = cpu::forward(&x, shape, &l.host[0], &l.host[1], running, true, 0.1, 1e-5, true);
        close(&y.to_vec(), &want, 1e-4, "y");
        close(&l.running_mean.to_vec(), &rm, 1e-5, "running_mean");
        close(&l.running_var.to_vec(), &rv, 1e-5, "running_var");
        let g = backward(&y.mul(&Tensor::from_vec(&dy, shape)).sum_all());
        let (dx, dw, db) = cpu::backward(&x, shape, &l.host[0], &l.host[1], running, &dy, true, 1e-5, true);
        close(&g.get(&xv).unwrap().to_vec(), &dx, 1e-4, "dx");
        close(&g.get(&l.weight).unwrap().to_vec(), &dw, 1e-3, "dweight");
        close(&g.get(&l.bias).unwrap().to_vec(), &db, 1e-3, "dbias");
    });
}

//! The CAML losses, the ramp and the optimizer against hand-computed values.

use approx::assert_relative_eq;
use caml_wgpu::caml::losses::{self, Ramp};
use caml_wgpu::gradcheck::{Rng, Tolerance, check_gradients};
use caml_wgpu::optim::{Sgd, SgdConfig};
use caml_wgpu::{Tensor, backward};

#[test]
fn dice_loss_matches_spec_formula() {
    let p = [0.9f32, 0.2, 0.6, 0.1, 0.7];
    let g = [1.0f32, 0.0, 1.0, 0.0, 0.0];
    let inter: f64 = 0.9 + 0.6;
    let want = 1.0 - (2.0 * inter + 1e-8) / (2.5 + 2.0 + 1e-8);
    let got = losses::dice_loss(&Tensor::from_vec(&p, &[5]), &Tensor::from_vec(&g, &[5])).item();
    assert_relative_eq!(got as f64, want, epsilon = 1e-6);
}

#[test]
fn sharpen_and_consistency_match_spec_formula() {
    let pv = [0.3f32, 0.7, 0.55, 0.45];
    let pa = [0.6f32, 0.4, 0.2, 0.8];
    let sharp = |p: f64| p.powf(10.0) / (p.powf(10.0) + (1.0 - p).powf(10.0));
    let got: Vec<f32> = losses::sharpen(&Tensor::from_vec(&pa, &[4]), 0.1).to_vec();
    for (g, &p) in got.iter().zip(&pa) {
        assert_relative_eq!(*g as f64, sharp(p as f64), epsilon = 1e-6);
    }
    let mse = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - sharp(y as f64)).powi(2)).sum::<f64>() / 4.0
    };
    let want = mse(&pv, &pa) + mse(&pa, &pv);
    let (tv, ta) = (Tensor::from_vec(&pv, &[4]), Tensor::from_vec(&pa, &[4]));
    assert_relative_eq!(losses::consistency_loss(&tv, &ta, 0.1, false).item() as f64, want, epsilon = 1e-6);
}

#[test]
fn fused_consistency_matches_cpu_and_the_composed_ops() {
    // Probabilities across (0, 1) with both ends and the middle, on a [4, 2, 9, 7, 5] map.
    let shape = [4, 2, 9, 7, 5];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(71);
    let mut pv = rng.vec(n, 0.0, 1.0);
    let pa = rng.vec(n, 0.0, 1.0);
    pv[..4].copy_from_slice(&[0.0, 1.0, 0.5, 1e-4]);
    for detach in [false, true] {
        let (want, want_dv, want_da) = caml_wgpu::ops::consistency::cpu::consistency(&pv, &pa, 0.1, detach);
        let run = |composed: bool| {
            let (v, a) = (Tensor::variable(&pv, &shape), Tensor::variable(&pa, &shape));
            let f = if composed { losses::consistency_loss_composed } else { losses::consistency_loss };
            let loss = f(&v, &a, 0.1, detach);
            let g = backward(&loss);
            (loss.item(), g.get(&v).unwrap().to_vec(), g.get(&a).unwrap().to_vec())
        };
        let (l, dv, da) = run(false);
        assert_relative_eq!(l, want, max_relative = 1e-5);
        close(&dv, &want_dv, 1e-5, "d P_v");
        close(&da, &want_da, 1e-5, "d P_a");
        let (lc, dvc, dac) = run(true);
        assert_relative_eq!(l, lc, max_relative = 1e-5);
        close(&dv, &dvc, 1e-5, "d P_v against the composed ops");
        close(&da, &dac, 1e-5, "d P_a against the composed ops");
    }
}

#[test]
fn consistency_targets_carry_gradient_unless_detached() {
    // With targets not detached, d loss / d P_a includes the path through sharpen(P_a).
    let pv = Tensor::variable(&[0.3, 0.7], &[2]);
    let pa = Tensor::variable(&[0.6, 0.4], &[2]);
    let g_full = backward(&losses::consistency_loss(&pv, &pa, 0.1, false)).remove(&pa).unwrap().to_vec();
    let pv = Tensor::variable(&[0.3, 0.7], &[2]);
    let pa = Tensor::variable(&[0.6, 0.4], &[2]);
    let g_det = backward(&losses::consistency_loss(&pv, &pa, 0.1, true)).remove(&pa).unwrap().to_vec();
    // Detached: only mse(P_a, sharpen(P_v)) depends on P_a: 2 (P_a - s(P_v)) / n.
    let sharp = |p: f64| p.powf(10.0) / (p.powf(10.0) + (1.0 - p).powf(10.0));
    for (i, (&a, &v)) in [0.6f64, 0.4].iter().zip(&[0.3f64, 0.7]).enumerate() {
        assert_relative_eq!(g_det[i] as f64, 2.0 * (a - sharp(v)) / 2.0, epsilon = 1e-5);
    }
    assert!((g_full[0] - g_det[0]).abs() > 1e-3, "the sharpened target must pass gradient");
    check_gradients(
        &[(vec![0.3, 0.7, 0.45], vec![3]), (vec![0.6, 0.4, 0.52], vec![3])],
        Tolerance { step: 1e-3, rel: 1e-2, abs: 1e-3 },
        |t| losses::consistency_loss(&t[0], &t[1], 0.1, false),
    );
}

#[test]
fn omni_correlation_loss_matches_hand_computation() {
    let mut rng = Rng::new(3);
    let (rows, cols, e) = (3, 4, 5);
    let fv = rng.vec(rows * e, -1.0, 1.0);
    let fa = rng.vec(rows * e, -1.0, 1.0);
    let mem = rng.vec(cols * e, -1.0, 1.0);
    let corr = |f: &[f32]| -> Vec<Vec<f64>> {
        (0..rows)
            .map(|r| {
                let l: Vec<f64> = (0..cols)
                    .map(|c| (0..e).map(|k| f[r * e + k] as f64 * mem[c * e + k] as f64).sum::<f64>() / 0.1)
                    .collect();
                let m = l.iter().cloned().fold(f64::MIN, f64::max);
                let s: f64 = l.iter().map(|v| (v - m).exp()).sum();
                l.iter().map(|v| (v - m).exp() / s).collect()
            })
            .collect()
    };
    let (cv, ca) = (corr(&fv), corr(&fa));
    let want: f64 = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .map(|(r, c)| -ca[r][c] * (cv[r][c] + 1e-8).ln())
        .sum::<f64>()
        / rows as f64;
    let m = Tensor::from_vec(&mem, &[cols, e]);
    let got = losses::omni_correlation_loss(
        &losses::omni_correlation(&Tensor::from_vec(&fv, &[rows, e]), &[&m], 0.1),
        &losses::omni_correlation(&Tensor::from_vec(&fa, &[rows, e]), &[&m], 0.1),
    );
    assert_relative_eq!(got.item() as f64, want, epsilon = 1e-4);
    check_gradients(
        &[
            (fv.iter().map(|v| v * 0.2).collect(), vec![rows, e]),
            (fa.iter().map(|v| v * 0.2).collect(), vec![rows, e]),
        ],
        Tolerance::default(),
        |t| {
            losses::omni_correlation_loss(
                &losses::omni_correlation(&t[0], &[&m], 0.1),
                &losses::omni_correlation(&t[1], &[&m], 0.1),
            )
        },
    );
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: entry {i}: got {g}, want {w}");
    }
}

/// loss_o composed of the per-op kernels, softmaxes and their logarithm kept for the backward.
fn composed_xent(lv: &Tensor, la: &Tensor, t: f32) -> Tensor {
    losses::omni_correlation_loss(&lv.mul_scalar(1.0 / t).softmax(1), &la.mul_scalar(1.0 / t).softmax(1))
}

#[test]
fn fused_correlation_cross_entropy_matches_the_composed_loss() {
    // Moderate logits, and large ones whose softmax saturates (entries below the 1e-8 floor).
    for (scale, t) in [(0.3f32, 0.1f32), (8.0, 0.1), (1.0, 1.0)] {
        let mut rng = Rng::new(31);
        let (rows, cols) = (9, 13);
        let lv: Vec<f32> = rng.vec(rows * cols, -scale, scale);
        let la: Vec<f32> = rng.vec(rows * cols, -scale, scale);
        let run = |fused: bool| {
            let (v, a) = (Tensor::variable(&lv, &[rows, cols]), Tensor::variable(&la, &[rows, cols]));
            let loss = if fused {
                caml_wgpu::ops::reduce::softmax_xent(&v, &a, t, 1e-8, v.dim(0))
            } else {
                composed_xent(&v, &a, t)
            };
            let g = backward(&loss.mul_scalar(1.7));
            (loss.item(), g.get(&v).unwrap().to_vec(), g.get(&a).unwrap().to_vec())
        };
        let ((lf, vf, af), (lc, vc, ac)) = (run(true), run(false));
        let what = format!("scale {scale} t {t}");
        assert_relative_eq!(lf, lc, max_relative = 1e-5);
        close(&vf, &vc, 1e-4, &format!("d lv, {what}"));
        close(&af, &ac, 1e-4, &format!("d la, {what}"));
    }
    let mut rng = Rng::new(32);
    let inputs = [(rng.vec(4 * 6, -0.3, 0.3), vec![4, 6]), (rng.vec(4 * 6, -0.3, 0.3), vec![4, 6])];
    check_gradients(&inputs, Tolerance::default(), |t| {
        caml_wgpu::ops::reduce::softmax_xent(&t[0], &t[1], 0.1, 1e-8, 3 * t[0].dim(0))
    });
}

#[test]
fn omni_loss_is_the_per_class_correlation_matrices_stacked() {
    let mut rng = Rng::new(33);
    let (n, e) = (20, 6);
    let fv = rng.vec(n * e, -0.5, 0.5);
    let fa = rng.vec(n * e, -0.5, 0.5);
    let m0 = Tensor::from_vec(&rng.vec(3 * e, -1.0, 1.0), &[3, e]);
    let m1 = Tensor::from_vec(&rng.vec(4 * e, -1.0, 1.0), &[4, e]);
    let idx = |v: &[u32]| Tensor::from_u32(v, &[v.len()]);
    let cases = [
        ([idx(&[3, 0, 7, 12, 5, 19]), idx(&[1, 2, 9, 4])], [Some(m0.clone()), Some(m1.clone())]),
        // A class with one row is left out; a class without memory contributes no columns.
        ([idx(&[8]), idx(&[1, 2, 9, 4, 6])], [None, Some(m1.clone())]),
    ];
    for (rows, memory) in &cases {
        let run = |fused: bool| {
            let (v, a) = (Tensor::variable(&fv, &[n, e]), Tensor::variable(&fa, &[n, e]));
            let loss = if fused {
                caml_wgpu::caml::omni::omni_loss(v.clone(), a.clone(), rows, memory, 0.1).unwrap()
            } else {
                // SPEC section 2, item 4, class by class.
                let present: Vec<&Tensor> = memory.iter().flatten().collect();
                let (mut cv, mut ca) = (Vec::new(), Vec::new());
                for r in rows.iter().filter(|r| r.numel() > 1) {
                    cv.push(losses::omni_correlation(&v.gather_rows(r), &present, 0.1));
                    ca.push(losses::omni_correlation(&a.gather_rows(r), &present, 0.1));
                }
                let stack = |m: Vec<Tensor>| if m.len() == 1 { m[0].clone() } else { Tensor::concat(&m, 0) };
                losses::omni_correlation_loss(&stack(cv), &stack(ca))
            };
            let g = backward(&loss);
            (loss.item(), g.get(&v).unwrap().to_vec(), g.get(&a).unwrap().to_vec())
        };
        let ((lf, vf, af), (lc, vc, ac)) = (run(true), run(false));
        assert_relative_eq!(lf, lc, max_relative = 1e-5);
        close(&vf, &vc, 1e-4, "d feats_v");
        close(&af, &ac, 1e-4, "d feats_a");
    }
    let none = [idx(&[1]), idx(&[2])];
    assert!(
        caml_wgpu::caml::omni::omni_loss(m0.clone(), m0.clone(), &none, &[Some(m1.clone()), None], 0.1)
            .is_none()
    );
}

#[test]
fn heads_computed_at_the_kept_rows_give_the_same_loss_and_gradients() {
    // Both networks' head pairs (projection then prediction, training mode) with the prediction
    // head's input computed at the kept rows only and its statistics from moments, against the
    // heads on every row and omni_loss on the rows taken after: loss, gradients of the rows and of
    // every head parameter, and the running statistics. 1200 rows take the one-pass kernels.
    use caml_wgpu::caml::model::{Caml, Head};
    let mut rng = Rng::new(41);
    let (n, width, e) = (1200, 4, 32);
    let (xv, xa) = (rng.vec(n * width, -1.0, 1.5), rng.vec(n * width, -1.0, 1.5));
    let memory = [
        Some(Tensor::from_vec(&rng.vec(5 * e, -1.0, 1.0), &[5, e])),
        Some(Tensor::from_vec(&rng.vec(3 * e, -1.0, 1.0), &[3, e])),
    ];
    let rows =
        [Tensor::from_u32(&[4, 17, 150, 1199], &[4]), Tensor::from_u32(&[0, 2, 33, 90, 201, 650], &[6])];
    let run = |at_rows: bool| {
        let model = Caml::new(width, e, false, 9);
        let (v, a) = (Tensor::variable(&xv, &[n, width]), Tensor::variable(&xa, &[n, width]));
        let heads1 = (&model.projection_head1, &model.prediction_head1);
        let heads2 = (&model.projection_head2, &model.prediction_head2);
        let loss = if at_rows {
            caml_wgpu::caml::omni::omni_loss_at(
                [&|idx| Head::pair_rows_at(heads1.0, heads1.1, &v, idx), &|idx| {
                    Head::pair_rows_at(heads2.0, heads2.1, &a, idx)
                }],
                &rows,
                &memory,
                0.1,
                10,
            )
        } else {
            let f = |(p, q): (&Head, &Head), x: &Tensor| q.forward(&p.forward(x, true), true);
            caml_wgpu::caml::omni::omni_loss(f(heads1, &v), f(heads2, &a), &rows, &memory, 0.1)
        };
        let loss = loss.unwrap();
        let g = backward(&loss);
        let (params, buffers) = model.named();
        let mut grads = vec![("rows_v".to_string(), g.get(&v).unwrap().to_vec())];
        grads.push(("rows_a".to_string(), g.get(&a).unwrap().to_vec()));
        for (k, t) in params.iter().filter(|(k, _)| k.contains("_head")) {
            grads.push((k.to_string(), g.get(t).unwrap().to_vec()));
        }
        let stats: Vec<(String, Vec<f32>)> = buffers
            .iter()
            .filter(|(k, _)| k.contains("_head") && !k.ends_with("num_batches_tracked"))
            .map(|(k, t)| (k.to_string(), t.to_vec()))
            .collect();
        (loss.item(), grads, stats)
    };
    let ((l1, g1, r1), (l2, g2, r2)) = (run(true), run(false));
    assert_relative_eq!(l1, l2, max_relative = 1e-5);
    assert_eq!(g1.len(), 2 + 4 * 6);
    for ((name, x), (_, y)) in g1.iter().zip(&g2) {
        // A bias before a training-mode BatchNorm cancels: both gradients are rounding noise.
        let tol = if name.ends_with(".0.bias") { 1e-3 } else { 1e-4 };
        close(x, y, tol, name);
    }
    for ((name, x), (_, y)) in r1.iter().zip(&r2) {
        close(x, y, 1e-5, name);
    }
}

#[test]
fn ramp_reproduces_the_released_first_iteration_loss() {
    let ramp = Ramp::paper(8);
    let (lc, lo) = ramp.weights(1);
    assert_relative_eq!(lc, (-5.0f64).exp(), epsilon = 1e-12);
    let loss = 0.5 * 1.586921 + lc * 0.427246 + lo * 13.700855;
    assert_relative_eq!(loss, 0.800955, epsilon = 1e-6);
    // Full weight once iter // 150 reaches R.
    assert_relative_eq!(ramp.weights(150 * 20).0, 1.0);
    assert_relative_eq!(ramp.weights(150 * 20 - 1).0, losses::sigmoid_rampup(19.0, 20.0));
    assert_eq!(Ramp::paper(4).length, 40.0);
    assert_eq!(Ramp::paper(16).length, 15.0);
}

#[test]
fn sgd_step_matches_pytorch_formula() {
    let w0 = [0.5f32, -1.0, 2.0];
    let grads = [[0.1f32, 0.2, -0.3], [0.05, -0.1, 0.2]];
    let w = Tensor::variable(&w0, &[3]);
    let c = SgdConfig::default();
    let mut opt = Sgd::new(c, std::slice::from_ref(&w));
    let (mut wr, mut buf) = (w0.map(|v| v as f64), [0f64; 3]);
    for (step, g) in grads.iter().enumerate() {
        // A loss whose gradient is exactly g: sum(w * g).
        let l = w.mul(&Tensor::from_vec(g, &[3])).sum_all();
        opt.step(std::slice::from_ref(&w), &backward(&l));
        for i in 0..3 {
            let gi = g[i] as f64 + 1e-4 * wr[i];
            buf[i] = if step == 0 { gi } else { 0.9 * buf[i] + gi };
            wr[i] -= 0.01 * buf[i];
        }
        for (got, want) in w.to_vec().iter().zip(&wr) {
            assert_relative_eq!(*got as f64, *want, epsilon = 1e-6);
        }
    }
}

#[test]
fn a_guarded_sgd_step_is_skipped_when_a_guard_value_is_not_finite() {
    let w0 = [0.5f32, -1.0, 2.0];
    let w = Tensor::variable(&w0, &[3]);
    let mut opt = Sgd::new(SgdConfig::default(), std::slice::from_ref(&w));
    let grads = || backward(&w.mul(&Tensor::from_vec(&[0.1, 0.2, -0.3], &[3])).sum_all());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        opt.step_guarded(std::slice::from_ref(&w), &grads(), &Tensor::from_vec(&[1.0, bad, 2.0], &[3]));
        assert_eq!(w.to_vec(), w0, "guard {bad}: weights untouched");
        assert_eq!(opt.momentum[0].to_vec(), vec![0.0; 3], "guard {bad}: momentum untouched");
    }
    // Finite guards: the plain step.
    opt.step_guarded(std::slice::from_ref(&w), &grads(), &Tensor::from_vec(&[1.0, -3e38, 0.0], &[3]));
    let want: Vec<f32> =
        w0.iter().zip([0.1f32, 0.2, -0.3]).map(|(&v, g)| v - 0.01 * (g + 1e-4 * v)).collect();
    for (got, want) in w.to_vec().iter().zip(&want) {
        assert_relative_eq!(*got, *want, epsilon = 1e-6);
    }
}

#[test]
fn sgd_steps_of_many_parameters_match_pytorch_formula() {
    // More parameters than one launch takes, of many sizes, two without a gradient (left as they
    // are); two steps against the f32 arithmetic of the formula in its order; then a guarded step
    // with a NaN that changes none of them.
    let sizes = [1usize, 3, 7, 300, 1, 5000, 2, 64, 9, 1, 17, 4096, 5, 33, 1, 8, 700, 2, 11];
    let no_grad = [4usize, 12];
    let mut rng = Rng::new(51);
    let w0: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect();
    let gs: Vec<Vec<Vec<f32>>> =
        (0..2).map(|_| sizes.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect()).collect();
    let params: Vec<Tensor> = w0.iter().zip(sizes).map(|(w, n)| Tensor::variable(w, &[n])).collect();
    let c = SgdConfig { lr: 0.03, momentum: 0.9, weight_decay: 1e-4 };
    let mut opt = Sgd::new(c, &params);
    let (mut want, mut buf) = (w0.clone(), sizes.iter().map(|&n| vec![0f32; n]).collect::<Vec<_>>());
    let loss = |g: &[Vec<f32>]| {
        let terms: Vec<Tensor> = (0..sizes.len())
            .filter(|k| !no_grad.contains(k))
            .map(|k| params[k].mul(&Tensor::from_vec(&g[k], &[sizes[k]])).sum_all())
            .collect();
        terms.iter().skip(1).fold(terms[0].clone(), |a, t| a.add(t))
    };
    for g in &gs {
        opt.step(&params, &backward(&loss(g)));
        for k in (0..sizes.len()).filter(|k| !no_grad.contains(k)) {
            for i in 0..sizes[k] {
                let gi = g[k][i] + c.weight_decay * want[k][i];
                buf[k][i] = c.momentum * buf[k][i] + gi;
                want[k][i] -= c.lr * buf[k][i];
            }
        }
        for (k, p) in params.iter().enumerate() {
            close(&p.to_vec(), &want[k], 1e-6, &format!("parameter {k} ({} values)", sizes[k]));
            close(&opt.momentum[k].to_vec(), &buf[k], 1e-6, &format!("momentum {k}"));
        }
    }
    opt.step_guarded(&params, &backward(&loss(&gs[0])), &Tensor::from_vec(&[0.5, f32::NAN], &[2]));
    for (k, p) in params.iter().enumerate() {
        close(&p.to_vec(), &want[k], 1e-6, &format!("parameter {k} after a skipped step"));
    }
}

#[test]
fn head_pair_at_the_kept_rows_matches_the_heads_on_every_row() {
    // A projection head then a prediction head in training mode: the prediction head's statistics
    // from the moments of the projection head's hidden rows, its input computed at the kept rows
    // only, against both heads on every row and the rows taken after. Output, gradients of the
    // rows and of every head parameter, and both BatchNorms' running statistics and counters.
    // 1500 rows take the one-pass Gram kernel, 40 the composed fallback.
    use caml_wgpu::caml::model::{Caml, Head};
    use caml_wgpu::gradcheck::weighted_sum;
    for (n, kept) in [(1500usize, vec![3u32, 1499, 700, 12, 256]), (40, vec![39, 0, 7]), (1500, vec![])] {
        let width = 4;
        let x = Rng::new(43).vec(n * width, -1.0, 2.0);
        let run = |pair: bool| {
            let model = Caml::new(width, 32, false, 5);
            let (proj, pred) = (&model.projection_head1, &model.prediction_head1);
            let xt = Tensor::variable(&x, &[n, width]);
            let index = Tensor::from_u32(&kept, &[kept.len()]);
            let y = if pair {
                Head::pair_rows_at(proj, pred, &xt, &index)
            } else {
                pred.forward(&proj.forward(&xt, true), true).gather_rows(&index)
            };
            let (params, buffers) = model.named();
            let heads: Vec<_> = params.iter().filter(|(k, _)| k.contains("_head1")).collect();
            let grads = (!kept.is_empty()).then(|| {
                let g = backward(&weighted_sum(&y, 44));
                let mut all = vec![("x".to_string(), g.get(&xt).unwrap().to_vec())];
                for (k, t) in &heads {
                    all.push((
                        k.to_string(),
                        g.get(t).map(|v| v.to_vec()).unwrap_or_else(|| vec![0.0; t.numel()]),
                    ));
                }
                all
            });
            let stats: Vec<(String, Vec<f32>)> = buffers
                .iter()
                .filter(|(k, _)| k.contains("_head1"))
                .map(|(k, t)| {
                    let v = if k.ends_with("num_batches_tracked") {
                        t.to_u32().iter().map(|&c| c as f32).collect()
                    } else {
                        t.to_vec()
                    };
                    (k.to_string(), v)
                })
                .collect();
            (y.to_vec(), grads, stats)
        };
        let ((y1, g1, s1), (y2, g2, s2)) = (run(true), run(false));
        close(&y1, &y2, 1e-4, "output");
        if let (Some(g1), Some(g2)) = (g1, g2) {
            for ((name, a), (_, b)) in g1.iter().zip(&g2) {
                // The prediction head's first bias cancels in its BatchNorm: both gradients are
                // rounding noise about zero.
                let tol = if name.ends_with("prediction_head1.0.bias") { 1e-3 } else { 1e-4 };
                close(a, b, tol, name);
            }
        }
        assert_eq!(s1.len(), 6);
        for ((name, a), (_, b)) in s1.iter().zip(&s2) {
            close(a, b, 1e-5, name);
        }
    }
}

#[test]
fn a_head_in_evaluation_matches_its_layers_with_the_running_statistics() {
    // The BatchNorm folded into the first layer (ReLU in its epilogue) against the layers one by
    // one on the CPU, with running statistics moved off their initial values by a training pass.
    use caml_wgpu::caml::model::Caml;
    let model = Caml::new(4, 32, false, 7);
    let head = &model.projection_head1;
    for (n, seed) in [(700usize, 60u64), (9, 61)] {
        let x = Rng::new(seed).vec(n * 4, -1.0, 2.0);
        let xt = Tensor::from_vec(&x, &[n, 4]);
        caml_wgpu::no_grad(|| head.forward(&xt, true));
        let got = caml_wgpu::no_grad(|| head.forward(&xt, false)).to_vec();
        let (params, buffers) = model.named();
        let get = |list: &Vec<(String, Tensor)>, k: &str| {
            list.iter().find(|(name, _)| name == &format!("projection_head1.{k}")).unwrap().1.to_vec()
        };
        let (w0, b0, g, b, w3, b3) = (
            get(&params, "0.weight"),
            get(&params, "0.bias"),
            get(&params, "1.weight"),
            get(&params, "1.bias"),
            get(&params, "3.weight"),
            get(&params, "3.bias"),
        );
        let (rm, rv) = (get(&buffers, "1.running_mean"), get(&buffers, "1.running_var"));
        assert!(rm.iter().any(|v| v.abs() > 1e-3), "running statistics moved");
        let mut want = Vec::new();
        for r in 0..n {
            let h: Vec<f64> = (0..32)
                .map(|o| {
                    let z = b0[o] as f64
                        + (0..4).map(|i| w0[o * 4 + i] as f64 * x[r * 4 + i] as f64).sum::<f64>();
                    let y = (z - rm[o] as f64) / (rv[o] as f64 + 1e-5).sqrt() * g[o] as f64 + b[o] as f64;
                    y.max(0.0)
                })
                .collect();
            want.extend(
                (0..32).map(|o| {
                    (b3[o] as f64 + (0..32).map(|i| w3[o * 32 + i] as f64 * h[i]).sum::<f64>()) as f32
                }),
            );
        }
        close(&got, &want, 1e-4, &format!("{n} rows"));
    }
}

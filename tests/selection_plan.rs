//! The omni-correlation's selection and the buffer plan, in a test binary of its own so that no
//! other test's buffers are counted.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;
use std::sync::Mutex;

mod tiny;

/// The tests of this file record steps of the one device's pool: one at a time.
static STEPS: Mutex<()> = Mutex::new(());

/// `f` recorded as one training step of the pool (its tensors released before the step ends).
fn in_step<T>(f: impl FnOnce() -> T) -> T {
    gpu().begin_step();
    let out = f();
    gpu().end_step();
    out
}

/// Runs `f`, steps whose selections differ in size from the steps before it, and checks that the
/// pool kept its plan and created no buffers.
fn keeps_one_plan(f: impl FnOnce()) {
    let g = gpu();
    let (plans, allocations) = (g.buffer_plans(), g.allocations());
    f();
    assert_eq!(g.buffer_plans(), plans, "a step with another number of rows left the plan");
    assert_eq!(g.allocations(), allocations, "a step with another number of rows created buffers");
}

/// The omni-correlation rows of a step whose class 1 has voxels or has none.
fn select_step(class1_empty: bool) -> [usize; 2] {
    use caml_wgpu::caml::omni;
    in_step(|| {
        let n = 6000;
        let conf =
            Tensor::from_vec(&(0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect::<Vec<_>>(), &[n]);
        let evens: Vec<u32> = (0..n as u32).step_by(2).collect();
        let odds: Vec<u32> = (1..n as u32).step_by(2).collect();
        let class0 = Tensor::from_u32(&evens, &[evens.len()]);
        let class1 =
            if class1_empty { Tensor::empty_u32(&[0]) } else { Tensor::from_u32(&odds, &[odds.len()]) };
        let rank = Tensor::from_u32(&(0..n as u32).collect::<Vec<_>>(), &[n]);
        let rows = omni::select_rows(&rank, [&class0, &class1], &conf, 1000);
        [rows[0].numel(), rows[1].numel()]
    })
}

#[test]
fn a_class_without_voxels_keeps_the_step_on_its_plan() {
    // The omni-correlation's selection makes the same requests when a class has no voxels, so
    // steps alternating between the two cases follow one plan.
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    // The first steps make the plan.
    for empty in [false, true, false, true] {
        select_step(empty);
    }
    let plans = g.buffer_plans();
    for i in 0..6 {
        let empty = i % 2 == 0;
        assert_eq!(select_step(empty), [1000, if empty { 0 } else { 1000 }]);
    }
    assert_eq!(g.buffer_plans(), plans, "a step with an empty class left the plan");
}

/// The Gram matrix and column sums of `rows` rows of 4 channels, less a shift, in a step.
fn gram_step(rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    in_step(|| {
        let x: Vec<f32> = (0..rows * 4).map(|i| ((i * 2654435761) % 1009) as f32 / 1009.0 - 0.3).collect();
        let shift = [0.1f32, -0.2, 0.05, 0.3];
        let (g, s) = caml_wgpu::ops::matmul::gram(
            &Tensor::from_vec(&x, &[rows, 4]),
            &Tensor::from_vec(&shift, &[4]),
            false,
        );
        (g.to_vec(), s.to_vec(), x)
    })
}

#[test]
fn grams_over_selections_of_any_size_keep_one_plan() {
    // Rows selected by a mask change in number from step to step by large factors: the Gram
    // kernel's partial sums then keep their buffers and launches, and the steps one plan.
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    for rows in [300, 40_000, 300] {
        gram_step(rows);
    }
    keeps_one_plan(|| {
        for rows in [40_000, 3000, 300, 17_000, 40_000, 1] {
            let (gram, sums, x) = gram_step(rows);
            let shift = [0.1f32, -0.2, 0.05, 0.3];
            let d = |r: usize, c: usize| (x[r * 4 + c] - shift[c]) as f64;
            for a in 0..4 {
                let want_sum: f64 = (0..rows).map(|r| d(r, a)).sum();
                assert!((sums[a] as f64 - want_sum).abs() <= 1e-4 * (rows as f64), "{rows} rows: sum {a}");
                for b in 0..4 {
                    let want: f64 = (0..rows).map(|r| d(r, a) * d(r, b)).sum();
                    let got = gram[a * 4 + b] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (rows as f64),
                        "{rows} rows: G[{a},{b}] {got} vs {want}"
                    );
                }
            }
        }
    });
}

#[test]
fn memory_draws_that_miss_an_entry_keep_the_step_on_its_plan() {
    // Class 1 has 200 features in one bank entry and 1 in the other: 20 draws miss the second
    // entry in most steps and take its row in some. Either way the step makes the same requests.
    use caml_wgpu::caml::memory::MemoryBank;
    use caml_wgpu::rng::Rng;
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let e = 4;
    let entry = |rows: usize, base: f32| {
        Tensor::from_vec(&(0..rows * e).map(|i| base + i as f32).collect::<Vec<_>>(), &[rows, e])
    };
    let mut bank = MemoryBank::new(2, 20, 230, e);
    bank.update(0, entry(230, 0.0), [30, 200]);
    bank.update(1, entry(31, 10_000.0), [30, 1]);
    // The class 1 feature of the second entry (its last row).
    let lone: Vec<f32> = (0..e).map(|j| 10_000.0 + (30 * e + j) as f32).collect();
    let mut rng = Rng::new(5);
    let draw = |rng: &mut Rng| {
        let rows = in_step(|| bank.sample(rng)[1].as_ref().expect("class 1 has enough features").to_vec());
        assert_eq!(rows.len(), 20 * e);
        rows.chunks(e).any(|r| r == lone.as_slice())
    };
    for _ in 0..4 {
        draw(&mut rng);
    }
    let plans = g.buffer_plans();
    let (mut hit, mut missed) = (0, 0);
    for _ in 0..40 {
        if draw(&mut rng) { hit += 1 } else { missed += 1 }
    }
    assert!(hit > 0 && missed > 0, "the draws took the lone feature in {hit} of 40 steps");
    assert_eq!(g.buffer_plans(), plans, "a step whose draws missed an entry left the plan");
}

/// The omni-correlation's cross-entropy and its gradients over `rows` rows of 128 logits (at
/// most 4000), in a step; the loss.
fn xent_step(rows: usize) -> f32 {
    in_step(|| {
        let logits = |seed: u64| {
            let v: Vec<f32> =
                (0..rows * 128).map(|i| ((i as u64 * 2654435761 + seed) % 997) as f32 / 997.0).collect();
            Tensor::variable(&v, &[rows, 128])
        };
        let (lv, la) = (logits(1), logits(2));
        let loss = caml_wgpu::ops::reduce::softmax_xent(&lv, &la, 0.1, 1e-8, 4000);
        let grads = caml_wgpu::backward(&loss);
        assert!(grads.get(&lv).is_some() && grads.get(&la).is_some());
        loss.item()
    })
}

#[test]
fn cross_entropies_over_any_number_of_rows_keep_one_plan() {
    // The rows are the kept voxels of a step, fewer or more than the adapter's fill: the sums
    // keep their launches and temporaries up to the bound, and the steps one plan.
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    for rows in [4000, 30, 4000] {
        xent_step(rows);
    }
    keeps_one_plan(|| {
        for rows in [803, 2, 1662, 4000, 97, 3200] {
            assert!(xent_step(rows).is_finite());
        }
    });
}

/// The heads of decoder 1 over `rows` voxel rows of 4 features, in a step: the memory bank's pass
/// (evaluation mode) and the omni-correlation's (training mode, `kept` of the rows kept, at most
/// 3000) with the gradients of a cross-entropy of its output. The bank's first row's sum and
/// the loss.
fn heads_step(model: &caml_wgpu::caml::model::Caml, rows: usize, kept: usize) -> [f32; 2] {
    use caml_wgpu::caml::model::Head;
    in_step(|| {
        let v: Vec<f32> = (0..rows * 4).map(|i| ((i * 2654435761) % 1009) as f32 / 1009.0 - 0.4).collect();
        let x = Tensor::variable(&v, &[rows, 4]);
        let bank = caml_wgpu::no_grad(|| model.projection_head1.forward(&x, false));
        let index: Vec<u32> = (0..kept).map(|i| (i * (rows / kept)) as u32).collect();
        let index = Tensor::from_u32(&index, &[kept]);
        let y = Head::pair_rows_at(&model.projection_head1, &model.prediction_head1, &x, &index);
        let loss = caml_wgpu::ops::reduce::softmax_xent(&y, &y, 0.1, 1e-8, 3000);
        let grads = caml_wgpu::backward(&loss);
        assert!(grads.get(&x).is_some());
        [bank.narrow(0, 0, 1).sum_all().item(), loss.item()]
    })
}

#[test]
fn heads_over_selections_of_any_size_keep_one_plan() {
    // The heads run on the voxels a mask selects, a few or many thousands: their layers take the
    // same kernels for any number of rows, and the steps one plan.
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = caml_wgpu::config::TrainConfig { width: 4, embed: 32, ..tiny::config() };
    let model = caml_wgpu::train::build_model(&cfg);
    for _ in 0..2 {
        heads_step(&model, 6000, 3000);
    }
    keeps_one_plan(|| {
        for (rows, kept) in [(40, 7), (2, 1), (6000, 3000), (700, 300), (255, 200), (1500, 1), (3, 2)] {
            let sums = heads_step(&model, rows, kept);
            assert!(sums.iter().all(|s| s.is_finite()), "{rows} rows, {kept} kept: {sums:?}");
        }
    });
}

#[test]
fn the_steps_after_a_rehearsal_create_no_buffers() {
    // Each iteration selects other voxels, in other numbers, as the model learns; the rehearsal
    // of the largest selections made every buffer they take.
    use caml_wgpu::caml::step::{flush, rehearse, train_step};
    let _one = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let cfg = tiny::config();
    let batch = tiny::batch(&cfg);
    let mut st = tiny::state(&cfg, 1e-4);
    assert!(rehearse(&mut st, &cfg, &batch).unwrap() > 0);
    let allocations = g.allocations();
    let mut logs = Vec::new();
    for _ in 0..4 {
        logs.extend(train_step(&mut st, &cfg, &batch).unwrap());
    }
    logs.extend(flush(&mut st).unwrap());
    assert_eq!(g.allocations(), allocations, "steps after the rehearsal created buffers");
    let loss_o: Vec<f32> = logs.iter().map(|l| l.loss_o).collect();
    assert!(loss_o.iter().all(|&v| v > 0.0) && loss_o.windows(2).any(|w| w[0] != w[1]), "{loss_o:?}");
}

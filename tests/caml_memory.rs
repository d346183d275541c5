//! The memory bank's update and sampling rules, and the omni-correlation row selection.

use caml_wgpu::Tensor;
use caml_wgpu::caml::memory::MemoryBank;
use caml_wgpu::caml::omni;
use caml_wgpu::ops::scan::{nonzero_many, prefix_count};
use caml_wgpu::rng::Rng;
use std::collections::HashSet;

mod tiny;

/// Rows [n, 2] whose first value identifies (case, class, row) uniquely.
fn tagged(case: usize, class: usize, n: usize) -> Tensor {
    let v: Vec<f32> = (0..n).flat_map(|r| [(case * 10000 + class * 1000 + r) as f32, class as f32]).collect();
    Tensor::from_vec(&v, &[n, 2])
}

#[test]
fn bank_samples_distinct_rows_of_one_class_from_every_entry() {
    let mut bank = MemoryBank::new(3, 20, 40, 2);
    bank.update(0, Tensor::concat(&[tagged(0, 0, 15), tagged(0, 1, 4)], 0), [15, 4]);
    // Iteration one: fewer than memory_num features of class 1 means no class-1 memory.
    let mut rng = Rng::new(1);
    let [m0, m1] = bank.sample(&mut rng);
    assert!(m0.is_none() && m1.is_none(), "15 < 20 and 4 < 20");
    bank.update(2, Tensor::concat(&[tagged(2, 0, 9), tagged(2, 1, 30)], 0), [9, 30]);
    assert_eq!((bank.count(0), bank.count(1)), (24, 34));
    let [m0, m1] = bank.sample(&mut rng);
    for (c, m) in [(0, m0.unwrap()), (1, m1.unwrap())] {
        assert_eq!(m.shape(), &[20, 2]);
        let v = m.to_vec();
        let ids: HashSet<i64> = v.chunks(2).map(|r| r[0] as i64).collect();
        assert_eq!(ids.len(), 20, "drawn without replacement");
        assert!(v.chunks(2).all(|r| r[1] == c as f32), "only class {c}");
    }
    // Replacing an entry drops its old rows.
    bank.update(2, Tensor::concat(&[tagged(5, 0, 2), tagged(5, 1, 1)], 0), [2, 1]);
    assert_eq!((bank.count(0), bank.count(1)), (17, 5));
    // Same seed, same draw.
    let a = bank.sample(&mut Rng::new(9))[0].as_ref().map(|t| t.to_vec());
    let b = bank.sample(&mut Rng::new(9))[0].as_ref().map(|t| t.to_vec());
    assert_eq!(a, b);
}

#[test]
fn bank_draws_are_positions_in_the_pooled_rows_of_a_class() {
    let mut bank = MemoryBank::new(3, 6, 10, 2);
    bank.update(0, Tensor::concat(&[tagged(0, 0, 4), tagged(0, 1, 3)], 0), [4, 3]);
    bank.update(2, Tensor::concat(&[tagged(2, 0, 5), tagged(2, 1, 4)], 0), [5, 4]);
    let picks = bank.draw(&mut Rng::new(4));
    let drawn = bank.sample(&mut Rng::new(4));
    for c in 0..2 {
        // The pooled rows of class c: every filled entry in order, its rows of c in order.
        let pooled: Vec<f32> = [(0, [4, 3]), (2, [5, 4])]
            .iter()
            .flat_map(|&(case, n)| (0..n[c]).map(move |r| (case * 10000 + c * 1000 + r) as f32))
            .collect();
        let picks = picks[c].as_ref().unwrap();
        assert_eq!(picks.len(), 6);
        assert!(picks.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {picks:?}");
        let want: Vec<f32> = picks.iter().map(|&p| pooled[p]).collect();
        let got: Vec<f32> = drawn[c].as_ref().unwrap().to_vec().chunks(2).map(|r| r[0]).collect();
        assert_eq!(got, want, "class {c}");
    }
}

#[test]
fn bank_entries_with_an_empty_class_are_kept() {
    let mut bank = MemoryBank::new(2, 3, 5, 2);
    bank.update(1, Tensor::concat(&[tagged(1, 0, 5), Tensor::zeros(&[0, 2])], 0), [5, 0]);
    assert_eq!((bank.count(0), bank.count(1)), (5, 0));
    let [m0, m1] = bank.sample(&mut Rng::new(3));
    assert_eq!(m0.unwrap().shape(), &[3, 2]);
    assert!(m1.is_none());
}

/// select_rows on host data: the consistent mask, each voxel's class and confidence.
fn omni_rows(consistent: &[f32], class: &[f32], conf: &[f32], k: usize) -> [Vec<u32>; 2] {
    let n = consistent.len();
    let mask = |c: f32| -> Vec<f32> {
        (0..n).map(|i| (consistent[i] == 1.0 && class[i] == c) as u8 as f32).collect()
    };
    let (m0, m1) = (Tensor::from_vec(&mask(0.0), &[n]), Tensor::from_vec(&mask(1.0), &[n]));
    let voxels = nonzero_many(&[&m0, &m1]);
    let rank = prefix_count(&Tensor::from_vec(consistent, &[n]));
    let got = omni::select_rows(&rank, [&voxels[0], &voxels[1]], &Tensor::from_vec(conf, &[n]), k);
    got.map(|t| t.to_u32())
}

#[test]
fn omni_rows_keep_the_most_confident_per_class_with_stable_ties() {
    let mut rng = Rng::new(5);
    let n = 3000;
    let class: Vec<f32> = (0..n).map(|_| rng.below(2) as f32).collect();
    let conf: Vec<f32> = (0..n).map(|_| 0.5 + rng.below(40) as f32 * 0.0125).collect();
    let consistent: Vec<f32> = (0..n).map(|_| (rng.below(5) != 0) as u8 as f32).collect();
    // Position of each voxel among the consistent ones.
    let position: Vec<u32> = consistent
        .iter()
        .scan(0u32, |s, &c| {
            let p = *s;
            *s += c as u32;
            Some(p)
        })
        .collect();
    let k = 700;
    let got = omni_rows(&consistent, &class, &conf, k);
    for (c, got_c) in got.iter().enumerate() {
        let mut rows: Vec<usize> = (0..n).filter(|&i| consistent[i] == 1.0 && class[i] == c as f32).collect();
        rows.sort_by(|&a, &b| conf[b].partial_cmp(&conf[a]).unwrap());
        rows.truncate(k);
        // The rows a stable sort by confidence keeps, in voxel order.
        rows.sort_unstable();
        let want: Vec<u32> = rows.iter().map(|&r| position[r]).collect();
        assert_eq!(got_c, &want, "class {c}");
    }
    // Under the cap every consistent voxel of the class is kept, in voxel order.
    let got = omni_rows(&[1.0, 0.0, 1.0, 1.0], &[1.0, 1.0, 0.0, 1.0], &[0.6, 0.8, 0.7, 0.9], 5);
    assert_eq!(got[0], vec![1]);
    assert_eq!(got[1], vec![0, 2]);
}

#[test]
fn omni_loss_matches_hand_computation_and_skips_single_rows() {
    let mut rng = Rng::new(8);
    let e = 3;
    let (fv, fa) = (rng.vec(6 * e, -1.0, 1.0), rng.vec(6 * e, -1.0, 1.0));
    let (m0, m1) = (rng.vec(4 * e, -1.0, 1.0), rng.vec(2 * e, -1.0, 1.0));
    let rows = [Tensor::from_u32(&[0, 2, 5], &[3]), Tensor::from_u32(&[4], &[1])];
    let memory = [Some(Tensor::from_vec(&m0, &[4, e])), Some(Tensor::from_vec(&m1, &[2, e]))];
    let got =
        omni::omni_loss(Tensor::from_vec(&fv, &[6, e]), Tensor::from_vec(&fa, &[6, e]), &rows, &memory, 0.1)
            .unwrap()
            .item();
    // Class 1 has a single row and is skipped; class 0's rows see both memories' columns.
    let mem: Vec<&[f32]> = m0.chunks(e).chain(m1.chunks(e)).collect();
    let corr = |f: &[f32], r: usize| -> Vec<f64> {
        let l: Vec<f64> = mem
            .iter()
            .map(|m| (0..e).map(|k| f[r * e + k] as f64 * m[k] as f64).sum::<f64>() / 0.1)
            .collect();
        let mx = l.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = l.iter().map(|v| (v - mx).exp()).sum();
        l.iter().map(|v| (v - mx).exp() / s).collect()
    };
    let want: f64 = [0usize, 2, 5]
        .iter()
        .map(|&r| {
            let (cv, ca) = (corr(&fv, r), corr(&fa, r));
            cv.iter().zip(&ca).map(|(v, a)| -a * (v + 1e-8).ln()).sum::<f64>()
        })
        .sum::<f64>()
        / 3.0;
    approx::assert_relative_eq!(got as f64, want, epsilon = 1e-4);
    // No memory at all: no loss.
    let none = omni::omni_loss(Tensor::zeros(&[6, e]), Tensor::zeros(&[6, e]), &rows, &[None, None], 0.1);
    assert!(none.is_none());
}

/// With no memory to compare with (memory_num past every voxel of the batch), there is no omni
/// loss, but the heads still run on the consistent voxels in training mode, as the reference's
/// do: every head's BatchNorm counts the iteration.
#[test]
fn heads_statistics_move_in_an_iteration_without_memory() {
    let cfg = caml_wgpu::config::TrainConfig { memory_num: 1 << 20, ..tiny::config() };
    let mut st = tiny::state(&cfg, 0.0);
    let batch = tiny::batch(&cfg);
    caml_wgpu::caml::step::train_step(&mut st, &cfg, &batch).unwrap();
    let (_, buffers) = st.model.named();
    for head in ["projection_head1", "prediction_head1", "projection_head2", "prediction_head2"] {
        let name = format!("{head}.1.num_batches_tracked");
        let (_, t) = buffers.iter().find(|(k, _)| *k == name).expect("a head's BatchNorm counter");
        assert_eq!(t.to_u32(), vec![1], "{name}");
    }
}

/// A rehearsed iteration leaves the training state as it found it: the iterations after it log
/// the same losses and end with the same weights, statistics, momentum and memory bank as
/// without it. (The rehearsal's batch has the other labeled case, whose bank entry the
/// iterations after it never replace. Equal up to rounding: with an empty tuning cache, another
/// test timing the same convolutions at once may settle on another kernel between the runs.)
#[test]
fn a_rehearsed_iteration_changes_nothing() {
    use caml_wgpu::caml::step::{flush, rehearse, train_step};
    let cfg = tiny::config();
    let batch = tiny::batch(&cfg);
    let mut other = batch.clone();
    other.indices.labeled = vec![1];
    let run = |rehearsed: bool| {
        let mut st = tiny::state(&cfg, 1e-4);
        if rehearsed {
            rehearse(&mut st, &cfg, &other).unwrap();
        }
        assert_eq!((st.iter, st.rng.state(), st.pending.is_none()), (0, Rng::new(1).state(), true));
        let mut logs = Vec::new();
        for _ in 0..3 {
            logs.extend(train_step(&mut st, &cfg, &batch).unwrap());
        }
        logs.extend(flush(&mut st).unwrap());
        let (params, buffers) = st.model.named();
        let values: Vec<Vec<f32>> = params
            .iter()
            .chain(&buffers)
            .map(|(_, t)| match t.dtype() {
                caml_wgpu::DType::F32 => t.to_vec(),
                caml_wgpu::DType::U32 => t.to_u32().into_iter().map(|v| v as f32).collect(),
            })
            .chain(st.opt.momentum.iter().map(Tensor::to_vec))
            .chain((0..st.bank.cases()).filter_map(|i| st.bank.entry(i)).map(|(rows, _)| rows.to_vec()))
            .collect();
        let losses: Vec<f32> = logs.iter().flat_map(|l| [l.loss, l.loss_s, l.loss_c, l.loss_o]).collect();
        (losses, values, st.bank.count(0), st.bank.count(1), st.rng.state())
    };
    // The convolutions' kernels chosen first.
    run(false);
    let (plain, rehearsed) = (run(false), run(true));
    assert_eq!(plain.0.len(), 12);
    assert!(plain.0.iter().skip(3).step_by(4).all(|&l| l > 0.0), "loss_o {:?}", plain.0);
    assert_eq!((plain.2, plain.3, plain.4), (rehearsed.2, rehearsed.3, rehearsed.4));
    let near = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    };
    assert!(
        near(&plain.0, &rehearsed.0),
        "a rehearsal changed the losses: {:?} vs {:?}",
        plain.0,
        rehearsed.0
    );
    for (i, (a, b)) in plain.1.iter().zip(&rehearsed.1).enumerate() {
        assert!(near(a, b), "a rehearsal changed state tensor {i}");
    }
    assert_eq!(plain.1.len(), rehearsed.1.len());
}

//! Ops on tensors larger than one storage binding: split into pieces that fit, with the same
//! results as the CPU references. The `small_limit` tests lower the limit on their thread so that
//! small tensors take every split path (rows of one reduction lane or one matrix split across
//! launches, pairs of a sort straddling windows); the `past_the_limit` tests use tensors just over
//! the adapter's real limit (128 MiB on software devices, where they take the split paths; on
//! adapters with larger limits they take the single-binding paths).

use caml_wgpu::caml::memory::MemoryBank;
use caml_wgpu::caml::model::Caml;
use caml_wgpu::caml::omni;
use caml_wgpu::gradcheck::{Rng, weighted_sum};
use caml_wgpu::ops::elementwise::{BinaryOp, cpu as ew_cpu};
use caml_wgpu::ops::{layernorm, layout, matmul, reduce, scan, sort, with_binding_limit};
use caml_wgpu::{Tensor, backward, no_grad};

/// 32 KiB: the smallest limit that holds an aligned run of scan blocks.
const SMALL: u64 = 32 * 1024;

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: entry {i}: got {g}, want {w}");
    }
}

fn data(seed: u64, n: usize) -> Vec<f32> {
    Rng::new(seed).vec(n, -2.0, 2.0)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A shape of f32 just over 128 MiB, the storage binding limit of software devices.
fn big(shape: &[usize]) -> Vec<usize> {
    let bytes = numel(shape) * 4;
    assert!(bytes > 128 << 20 && bytes < 129 << 20, "{shape:?}: {bytes} bytes");
    shape.to_vec()
}

/// x[.., start..start + len, ..] along `axis`.
fn narrow_cpu(x: &[f32], shape: &[usize], axis: usize, start: usize, len: usize) -> Vec<f32> {
    let (outer, n, inner) = (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]));
    (0..outer)
        .flat_map(|o| x[(o * n + start) * inner..(o * n + start + len) * inner].iter().copied())
        .collect()
}

fn gather_cpu<T: Copy>(table: &[T], cols: usize, index: &[u32]) -> Vec<T> {
    index.iter().flat_map(|&r| table[r as usize * cols..(r as usize + 1) * cols].iter().copied()).collect()
}

/// d(sum(w * x.gather_rows(index)))/dx.
fn scatter_cpu(w: &[f32], cols: usize, index: &[u32], rows: usize) -> Vec<f32> {
    let mut acc = vec![0f64; rows * cols];
    for (r, &i) in index.iter().enumerate() {
        for c in 0..cols {
            acc[i as usize * cols + c] += w[r * cols + c] as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

fn nonzero_cpu(x: &[f32]) -> Vec<u32> {
    x.iter().enumerate().filter(|&(_, &v)| v != 0.0).map(|(i, _)| i as u32).collect()
}

/// The gradient of softmax (or log-softmax) along `axis` for dL/dy = w.
fn softmax_grad_cpu(y: &[f32], w: &[f32], shape: &[usize], axis: usize, log: bool) -> Vec<f32> {
    let (outer, r, inner) = (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]));
    let mut out = vec![0f32; y.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * r + k) * inner + i;
            let s: f64 =
                (0..r).map(|k| if log { w[at(k)] as f64 } else { (w[at(k)] * y[at(k)]) as f64 }).sum();
            for k in 0..r {
                let (yk, wk) = (y[at(k)] as f64, w[at(k)] as f64);
                out[at(k)] = if log { (wk - yk.exp() * s) as f32 } else { (yk * (wk - s)) as f32 };
            }
        }
    }
    out
}

fn random_index(seed: u64, n: usize, rows: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut idx: Vec<u32> = (0..n).map(|_| rng.below(rows as u64) as u32).collect();
    idx[0] = 0;
    idx[n - 1] = rows as u32 - 1;
    idx
}

/// Values in [-2, 2) with about half of them exactly zero.
fn half_zero(seed: u64, n: usize) -> Vec<f32> {
    data(seed, n).into_iter().map(|v| if v < 0.0 { 0.0 } else { v }).collect()
}

fn check_layout(x: &[f32], shape: &[usize], perms: &[&[usize]], narrow_axes: &[usize]) {
    let tx = Tensor::from_vec(x, shape);
    for perm in perms {
        let want = layout::cpu::permute(x, shape, perm);
        assert_eq!(tx.permute(perm).to_vec(), want, "permute {perm:?} of {shape:?}");
    }
    for &axis in narrow_axes {
        let (start, len) = (1, shape[axis] - 2);
        let want = narrow_cpu(x, shape, axis, start, len);
        assert_eq!(tx.narrow(axis, start, len).to_vec(), want, "narrow axis {axis} of {shape:?}");
    }
    // Joining two slices along the last axis gives the tensor back.
    let (last, cut) = (shape.len() - 1, shape[shape.len() - 1] / 2);
    let parts = [tx.narrow(last, 0, cut), tx.narrow(last, cut, shape[last] - cut)];
    assert_eq!(Tensor::concat(&parts, last).to_vec(), x, "concat along {last} of {shape:?}");
}

#[test]
fn layout_ops_split_under_a_small_limit() {
    let shape = [3, 5, 37, 71];
    let x = data(1, numel(&shape));
    // A matrix whose rows and columns both overflow: its transpose splits both axes.
    let m = [181, 217];
    let xm = data(2, numel(&m));
    with_binding_limit(SMALL, || {
        check_layout(
            &x,
            &shape,
            &[&[0, 2, 3, 1], &[3, 2, 1, 0], &[1, 0, 3, 2], &[2, 3, 0, 1]],
            &[0, 1, 2, 3],
        );
        check_layout(&xm, &m, &[&[1, 0]], &[0, 1]);
    });
}

#[test]
fn row_ops_and_compaction_split_under_a_small_limit() {
    let (rows, cols) = (2003, 7);
    let table = half_zero(3, rows * cols);
    let index = random_index(4, 20000, rows);
    let bits: Vec<u32> = (0..20011u32).map(|i| i.wrapping_mul(2654435761)).collect();
    let bits_index = random_index(5, 15000, bits.len());
    let mask = half_zero(6, 50001);
    with_binding_limit(SMALL, || {
        let t = Tensor::variable(&table, &[rows, cols]);
        let ti = Tensor::from_u32(&index, &[index.len()]);
        let y = t.gather_rows(&ti);
        assert_eq!(y.to_vec(), gather_cpu(&table, cols, &index), "gather_rows");
        let g = backward(&weighted_sum(&y, 7)).remove(&t).unwrap();
        let w = Rng::new(7).vec(y.numel(), -1.0, 1.0);
        close(&g.to_vec(), &scatter_cpu(&w, cols, &index, rows), 1e-5, "scatter_add_rows");
        let tb = Tensor::from_u32(&bits, &[bits.len()]);
        let got = tb.gather_rows(&Tensor::from_u32(&bits_index, &[bits_index.len()])).to_u32();
        assert_eq!(got, gather_cpu(&bits, 1, &bits_index), "gather of U32 values");
        let tm = Tensor::from_vec(&mask, &[mask.len()]);
        assert_eq!(scan::nonzero(&tm).to_u32(), nonzero_cpu(&mask), "nonzero");
        let both = scan::nonzero_many(&[&tm, &t.reshape(&[rows * cols])]);
        assert_eq!(both[1].to_u32(), nonzero_cpu(&table), "nonzero_many");
        let row_mask: Vec<f32> = mask[..rows].to_vec();
        let sel = t.select_rows(&Tensor::from_vec(&row_mask, &[rows]));
        assert_eq!(sel.to_vec(), gather_cpu(&table, cols, &nonzero_cpu(&row_mask)), "select_rows");
    });
}

#[test]
fn reductions_split_under_a_small_limit() {
    // One lane of a reduction over axis 0 spans 10007 elements, over the 8192 of one binding:
    // its rows are split over launches that accumulate.
    let long = [3, 10007];
    let x = data(8, numel(&long));
    let s = [5, 13, 601];
    let x2 = data(9, numel(&s));
    // An axis longer than the 65535 loop iterations after which software devices end a shader
    // invocation's loops.
    let tall = [70001, 3];
    let x3 = data(29, numel(&tall));
    let (vals, args) = reduce::cpu::max_axis(&x3, &tall, 0);
    let t3 = Tensor::from_vec(&x3, &tall);
    close(&t3.max_axis(0).to_vec(), &vals, 0.0, "max_axis along 70001");
    close(&t3.argmax(0).to_vec(), &args, 0.0, "argmax along 70001");
    // Softmax visits its axis three times: 21000 entries stay within the budget of one invocation.
    let wide = [2, 21000];
    let x4 = data(28, numel(&wide));
    let y4 = Tensor::from_vec(&x4, &wide).softmax(1).to_vec();
    close(&y4, &reduce::cpu::softmax(&x4, &wide, 1, false), 1e-5, "softmax along 21000");
    with_binding_limit(SMALL, || {
        let tx = Tensor::variable(&x, &long);
        for axis in 0..2 {
            close(&tx.sum(&[axis], false).to_vec(), &reduce::cpu::sum_axis(&x, &long, axis), 1e-5, "sum");
            let (vals, args) = reduce::cpu::max_axis(&x, &long, axis);
            close(&tx.max_axis(axis).to_vec(), &vals, 0.0, "max_axis");
            close(&tx.argmax(axis).to_vec(), &args, 0.0, "argmax");
        }
        let total: f64 = x.iter().map(|&v| v as f64).sum();
        close(&tx.sum_all().to_vec(), &[total as f32], 1e-5, "sum_all");
        // The gradient of max lands on the first index reaching it.
        let g = backward(&weighted_sum(&tx.max_axis(0), 10)).remove(&tx).unwrap();
        let w = Rng::new(10).vec(long[1], -1.0, 1.0);
        let args = reduce::cpu::max_axis(&x, &long, 0).1;
        let want: Vec<f32> = (0..x.len())
            .map(|e| if args[e % long[1]] as usize == e / long[1] { w[e % long[1]] } else { 0.0 })
            .collect();
        close(&g.to_vec(), &want, 0.0, "max_axis gradient");

        let t2 = Tensor::variable(&x2, &s);
        close(
            &t2.sum(&[0, 2], true).to_vec(),
            &reduce::cpu::sum_axis(&reduce::cpu::sum_axis(&x2, &s, 0), &[13, 601], 1),
            1e-5,
            "sum over axes 0, 2",
        );
        for log in [false, true] {
            let y = if log { t2.log_softmax(1) } else { t2.softmax(1) };
            let want = reduce::cpu::softmax(&x2, &s, 1, log);
            close(&y.to_vec(), &want, 1e-5, "softmax");
            let g = backward(&weighted_sum(&y, 11)).remove(&t2).unwrap();
            let w = Rng::new(11).vec(y.numel(), -1.0, 1.0);
            close(&g.to_vec(), &softmax_grad_cpu(&want, &w, &s, 1, log), 1e-4, "softmax gradient");
        }
    });
}

#[test]
#[should_panic(
    expected = "over this adapter's limit of 32768 bytes per storage binding and one lane's rows still span"
)]
fn a_softmax_whose_rows_span_more_than_one_binding_is_reported() {
    let x = Tensor::zeros(&[3, 10007]);
    with_binding_limit(SMALL, || no_grad(|| x.softmax(0).to_vec()));
}

#[test]
#[should_panic(
    expected = "gather_rows: a tensor of shape [3, 10000] (120000 bytes) is over this adapter's limit of \
                           32768 bytes per storage binding and one row still spans 40000 bytes; use a smaller patch"
)]
fn a_row_over_one_binding_is_reported() {
    let (x, index) = (Tensor::zeros(&[3, 10000]), Tensor::from_u32(&[2, 0], &[2]));
    with_binding_limit(SMALL, || no_grad(|| x.gather_rows(&index).to_vec()));
}

#[test]
fn consistency_loss_splits_under_a_small_limit() {
    // 30,000 values per map, 120 KB: four launches of at most 32 KiB.
    let n = 30_000;
    let (pv, pa) = (Rng::new(90).vec(n, 0.0, 1.0), Rng::new(91).vec(n, 0.0, 1.0));
    let (want, want_dv, want_da) = caml_wgpu::ops::consistency::cpu::consistency(&pv, &pa, 0.1, false);
    let (v, a) = (Tensor::variable(&pv, &[n]), Tensor::variable(&pa, &[n]));
    let (loss, dv, da) = with_binding_limit(SMALL, || {
        let loss = caml_wgpu::ops::consistency::consistency_loss(&v, &a, 0.1, false);
        let g = backward(&loss);
        (loss.item(), g.get(&v).unwrap().to_vec(), g.get(&a).unwrap().to_vec())
    });
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "loss {loss}, want {want}");
    close(&dv, &want_dv, 1e-5, "d P_v");
    close(&da, &want_da, 1e-5, "d P_a");
}

#[test]
fn matmul_and_broadcasts_split_under_a_small_limit() {
    let (b, m, k, n) = (3, 67, 151, 29);
    let a = data(12, b * m * k);
    let bm = data(13, k * n);
    let b_rep: Vec<f32> = (0..b).flat_map(|_| bm.iter().copied()).collect();
    // K = 3001 rows of both operands: the product is summed over launches.
    let (kk, mm, nn) = (3001, 13, 11);
    let (p, q) = (data(14, kk * mm), data(15, kk * nn));
    let (ba, bb) = ([37, 1001], [1, 1001]);
    // A product over K = 70001, longer than a software device's shader loops may run.
    let (pk, qk) = (data(30, 70001 * 3), data(31, 70001 * 2));
    let want = matmul::matmul_cpu(&pk, &qk, [1, 3, 70001, 2], true, false);
    let got = matmul::matmul_t(
        &Tensor::from_vec(&pk, &[70001, 3]),
        &Tensor::from_vec(&qk, &[70001, 2]),
        true,
        false,
    );
    close(&got.to_vec(), &want, 1e-4, "matmul over K = 70001");
    let (xa, xb, xc) = (data(16, numel(&ba)), data(17, numel(&bb)), data(18, 37));
    with_binding_limit(SMALL, || {
        let transpose = |x: &[f32], r: usize, c: usize| layout::cpu::permute(x, &[r, c], &[1, 0]);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ad: Vec<f32> = if ta {
                (0..b).flat_map(|z| transpose(&a[z * m * k..(z + 1) * m * k], m, k)).collect()
            } else {
                a.clone()
            };
            let bd = if tb { transpose(&bm, k, n) } else { bm.clone() };
            let at = Tensor::from_vec(&ad, &if ta { [b, k, m] } else { [b, m, k] });
            let bt = Tensor::from_vec(&bd, &if tb { [n, k] } else { [k, n] });
            let want = matmul::matmul_cpu(&a, &b_rep, [b, m, k, n], false, false);
            close(&matmul::matmul_t(&at, &bt, ta, tb).to_vec(), &want, 1e-4, "batched matmul");
        }
        let (tp, tq) = (Tensor::from_vec(&p, &[kk, mm]), Tensor::from_vec(&q, &[kk, nn]));
        let want = matmul::matmul_cpu(&p, &q, [1, mm, kk, nn], true, false);
        close(&matmul::matmul_t(&tp, &tq, true, false).to_vec(), &want, 1e-4, "matmul summed over K");

        let (ta, tb, tc) =
            (Tensor::from_vec(&xa, &ba), Tensor::from_vec(&xb, &bb), Tensor::from_vec(&xc, &[37, 1]));
        for (op, other, shape) in [(BinaryOp::Add, &tb, &bb[..]), (BinaryOp::Mul, &tc, &[37, 1][..])] {
            let ov = if shape == bb { &xb } else { &xc };
            let want = ew_cpu::binary(op, &xa, &ba, ov, shape).0;
            close(&caml_wgpu::ops::elementwise::binary(op, &ta, other).to_vec(), &want, 1e-6, "broadcast");
        }
        // A broadcast operand's gradient is summed back to its shape.
        let v = Tensor::variable(&xb, &bb);
        let g = backward(&weighted_sum(&ta.add(&v), 19)).remove(&v).unwrap();
        let w = Rng::new(19).vec(numel(&ba), -1.0, 1.0);
        close(&g.to_vec(), &reduce::cpu::sum_axis(&w, &ba, 0), 1e-5, "broadcast gradient");
    });
}

#[test]
fn top_indices_and_layer_norm_split_under_a_small_limit() {
    // 20000 keys pad to 32768 pairs: windows of 8192, and steps whose pairs straddle windows.
    let mut keys = data(20, 20000);
    keys[7] = keys[9000];
    keys[19999] = keys[3];
    let (rows, d) = (1111, 37);
    let x = data(21, rows * d);
    let (w, b) = (data(22, d), data(23, d));
    let g = data(24, rows * d);
    let unsplit = {
        let tx = Tensor::variable(&x, &[rows, d]);
        let (tw, tb) = (Tensor::variable(&w, &[d]), Tensor::variable(&b, &[d]));
        let y = tx.layer_norm(&tw, &tb, 1e-5);
        let mut grads = backward(&y.mul(&Tensor::from_vec(&g, &[rows, d])).sum_all());
        [&tx, &tw, &tb].map(|t| grads.remove(t).unwrap().to_vec())
    };
    with_binding_limit(SMALL, || {
        let got = sort::top_indices(&Tensor::from_vec(&keys, &[keys.len()]), 15000).to_u32();
        assert_eq!(got, sort::top_indices_cpu(&keys, 15000), "top_indices");
        let mut want = sort::top_indices_cpu(&keys, 15000);
        want.sort_unstable();
        let got = sort::top_set(&Tensor::from_vec(&keys, &[keys.len()]), 15000, 40000).to_u32();
        assert_eq!(got, want, "top_set");
        let tx = Tensor::variable(&x, &[rows, d]);
        let (tw, tb) = (Tensor::variable(&w, &[d]), Tensor::variable(&b, &[d]));
        let y = tx.layer_norm(&tw, &tb, 1e-5);
        close(&y.to_vec(), &layernorm::cpu::layer_norm(&x, &w, &b, 1e-5), 1e-4, "layer_norm");
        let mut grads = backward(&y.mul(&Tensor::from_vec(&g, &[rows, d])).sum_all());
        for (t, want, what) in [(&tx, &unsplit[0], "dx"), (&tw, &unsplit[1], "dw"), (&tb, &unsplit[2], "db")]
        {
            close(&grads.remove(t).unwrap().to_vec(), want, 1e-4, what);
        }
    });
}

/// The ops a CAML iteration applies to the projection embeddings ([N, F, X, Y, Z]): voxel rows
/// of some samples, the bank update and draw, the heads on selected rows, the omni-correlation
/// loss; returns loss_o and the gradients of the embedding and the heads' parameters.
fn caml_rows_path(emb: &[f32], shape: [usize; 5]) -> Vec<Vec<f32>> {
    let [n, f, ..] = shape;
    // A fresh model: training-mode BatchNorm updates its running statistics.
    let model = Caml::new(f, 32, false, 28);
    let voxels = numel(&shape[2..]);
    let e = Tensor::variable(emb, &shape);
    let rows_of = |i: usize, k: usize| e.narrow(0, i, k).permute(&[0, 2, 3, 4, 1]).reshape(&[k * voxels, f]);
    let mut bank = MemoryBank::new(1, 40, voxels, 32);
    no_grad(|| {
        let counts = [voxels / 3, voxels / 4];
        let rows = Tensor::concat_u32(&[
            &Tensor::from_u32(&(0..counts[0] as u32).map(|r| 3 * r).collect::<Vec<_>>(), &[counts[0]]),
            &Tensor::from_u32(&(0..counts[1] as u32).map(|r| 4 * r + 1).collect::<Vec<_>>(), &[counts[1]]),
        ]);
        let v = model.projection_head1.forward(&rows_of(0, 1).gather_rows(&rows), false);
        bank.update(0, v, counts);
    });
    let memory = bank.sample(&mut Rng::new(25));
    let u = n - 1;
    let keep: Vec<f32> = (0..u * voxels).map(|r| (r % 5 != 2) as u8 as f32).collect();
    let sel = scan::nonzero(&Tensor::from_vec(&keep, &[u * voxels]));
    let feats = |i: usize| {
        let rows = rows_of(1, u).gather_rows(&sel);
        let (p, q) = if i == 0 {
            (&model.projection_head1, &model.prediction_head1)
        } else {
            (&model.projection_head2, &model.prediction_head2)
        };
        q.forward(&p.forward(&rows, true), true)
    };
    let (fv, fa) = (feats(0), feats(1));
    let class: Vec<f32> = (0..sel.numel()).map(|r| (r % 3 == 0) as u8 as f32).collect();
    let conf = Rng::new(26).vec(sel.numel(), 0.5, 1.0);
    // Every selected row counts as consistent: positions are row indices.
    let m = class.len();
    let of_class =
        |c: f32| Tensor::from_vec(&class.iter().map(|&k| (k == c) as u8 as f32).collect::<Vec<_>>(), &[m]);
    let voxels = scan::nonzero_many(&[&of_class(0.0), &of_class(1.0)]);
    let rank = scan::prefix_count(&Tensor::full(&[m], 1.0));
    let chosen = omni::select_rows(&rank, [&voxels[0], &voxels[1]], &Tensor::from_vec(&conf, &[m]), 300);
    let loss = omni::omni_loss(fv.clone(), fa.clone(), &chosen, &memory, 0.1)
        .expect("both classes have rows and memory");
    let mut grads = backward(&loss);
    let mut out = vec![loss.to_vec(), grads.remove(&e).unwrap().to_vec()];
    for p in model.params() {
        if let Some(g) = grads.remove(&p) {
            out.push(g.to_vec());
        }
    }
    out
}

#[test]
fn caml_embedding_rows_path_matches_under_a_small_limit() {
    let shape = [3, 6, 9, 10, 11];
    let emb = data(27, numel(&shape));
    let unsplit = caml_rows_path(&emb, shape);
    let split = with_binding_limit(SMALL, || caml_rows_path(&emb, shape));
    assert_eq!(unsplit.len(), split.len());
    assert!(unsplit.len() > 2, "gradients reach the heads");
    for (k, (a, b)) in unsplit.iter().zip(&split).enumerate() {
        close(b, a, 1e-4, &format!("loss_o and gradients, part {k}"));
    }
}

#[test]
fn layout_ops_split_past_the_limit() {
    let shape = big(&[3, 7, 1601, 999]);
    let x = data(30, numel(&shape));
    check_layout(&x, &shape, &[&[0, 2, 3, 1], &[3, 1, 2, 0]], &[0, 2]);
}

#[test]
fn row_ops_and_compaction_split_past_the_limit() {
    let (rows, cols) = (1_343_001, 25);
    big(&[rows, cols]);
    let table = half_zero(31, rows * cols);
    let t = Tensor::variable(&table, &[rows, cols]);
    // A few rows from anywhere in the table, then every row in reverse: an output over the limit.
    let index = random_index(32, 7001, rows);
    let got = t.gather_rows(&Tensor::from_u32(&index, &[index.len()]));
    assert_eq!(got.to_vec(), gather_cpu(&table, cols, &index), "gather_rows");
    let reverse: Vec<u32> = (0..rows as u32).rev().collect();
    let got = no_grad(|| t.gather_rows(&Tensor::from_u32(&reverse, &[rows])).to_vec());
    assert!(got.chunks(cols).zip(table.chunks(cols).rev()).all(|(a, b)| a == b), "gather of every row");
    drop(got);
    // The table's gradient through a gather with repeated rows: scatter-add over windows.
    let index = random_index(33, 50000, rows);
    let y = t.gather_rows(&Tensor::from_u32(&index, &[index.len()]));
    let g = backward(&weighted_sum(&y, 34)).remove(&t).unwrap().to_vec();
    let w = Rng::new(34).vec(y.numel(), -1.0, 1.0);
    close(&g, &scatter_cpu(&w, cols, &index, rows), 1e-5, "scatter_add_rows");
    drop(g);
    let flat = t.reshape(&[rows * cols]);
    assert_eq!(scan::nonzero(&flat).to_u32(), nonzero_cpu(&table), "nonzero");
    let row_mask: Vec<f32> = (0..rows).map(|r| table[r * cols]).collect();
    let sel = t.select_rows(&Tensor::from_vec(&row_mask, &[rows]));
    assert_eq!(sel.to_vec(), gather_cpu(&table, cols, &nonzero_cpu(&row_mask)), "select_rows");
    drop((t, flat, table));
    let bits: Vec<u32> = (0..(rows * cols) as u32).map(|i| i.wrapping_mul(2654435761)).collect();
    let index = random_index(35, 9001, bits.len());
    let got = Tensor::from_u32(&bits, &[bits.len()]).gather_rows(&Tensor::from_u32(&index, &[index.len()]));
    assert_eq!(got.to_u32(), gather_cpu(&bits, 1, &index), "gather of U32 values");
}

#[test]
fn reductions_split_past_the_limit() {
    let shape = big(&[3, 7, 1601, 999]);
    let x = data(36, numel(&shape));
    let t = Tensor::variable(&x, &shape);
    let per_channel = reduce::cpu::sum_axis(&reduce::cpu::sum_axis(&x, &shape, 0), &shape[1..], 1);
    let per_channel = reduce::cpu::sum_axis(&per_channel, &[7, 999], 1);
    close(&t.sum(&[0, 2, 3], false).to_vec(), &per_channel, 1e-4, "sum over axes 0, 2, 3");
    close(&t.sum(&[3], false).to_vec(), &reduce::cpu::sum_axis(&x, &shape, 3), 1e-4, "sum over axis 3");
    let total: f64 = x.iter().map(|&v| v as f64).sum();
    let got = t.sum_all().item();
    assert!((got as f64 - total).abs() < 1e-3 * x.len() as f64 / 1e4, "sum_all {got}, want {total}");
    let (vals, args) = reduce::cpu::max_axis(&x, &shape, 1);
    close(&t.max_axis(1).to_vec(), &vals, 0.0, "max_axis");
    close(&t.argmax(1).to_vec(), &args, 0.0, "argmax");
    drop((vals, args));
    let y = t.log_softmax(1);
    let want = reduce::cpu::softmax(&x, &shape, 1, true);
    close(&y.to_vec(), &want, 1e-5, "log_softmax");
    let g = backward(&weighted_sum(&y, 37)).remove(&t).unwrap().to_vec();
    let w = Rng::new(37).vec(x.len(), -1.0, 1.0);
    close(&g, &softmax_grad_cpu(&want, &w, &shape, 1, true), 1e-4, "log_softmax gradient");
    drop((g, w, want));
    let want = reduce::cpu::softmax(&x, &shape, 1, false);
    close(&no_grad(|| t.softmax(1)).to_vec(), &want, 1e-5, "softmax");
}

#[test]
fn matmul_linear_and_layer_norm_split_past_the_limit() {
    // A projection head's first linear layer on a million rows: rows of x in several launches,
    // the weight gradient summed over launches along the rows.
    let (rows, inp, out) = (1_048_601, 32, 8);
    big(&[rows, inp]);
    let x = data(38, rows * inp);
    let (w, b) = (data(39, out * inp), data(40, out));
    let tx = Tensor::variable(&x, &[rows, inp]);
    let (tw, tb) = (Tensor::variable(&w, &[out, inp]), Tensor::variable(&b, &[out]));
    let y = caml_wgpu::ops::linear::linear(&tx, &tw, Some(&tb));
    close(&y.to_vec(), &caml_wgpu::ops::linear::cpu::linear(&x, &w, &b, [rows, inp, out]), 1e-4, "linear");
    let mut grads = backward(&weighted_sum(&y, 41));
    let g = Rng::new(41).vec(rows * out, -1.0, 1.0);
    close(
        &grads.remove(&tx).unwrap().to_vec(),
        &matmul::matmul_cpu(&g, &w, [1, rows, out, inp], false, false),
        1e-4,
        "dx",
    );
    close(
        &grads.remove(&tw).unwrap().to_vec(),
        &matmul::matmul_cpu(&g, &x, [1, out, rows, inp], true, false),
        1e-3,
        "dw",
    );
    close(&grads.remove(&tb).unwrap().to_vec(), &reduce::cpu::sum_axis(&g, &[rows, out], 0), 1e-3, "db");
    drop((y, grads, g));
    let y = no_grad(|| {
        tx.layer_norm(&tw.narrow(0, 0, 1).reshape(&[inp]), &tw.narrow(0, 1, 1).reshape(&[inp]), 1e-5)
    });
    let want = layernorm::cpu::layer_norm(&x, &w[..inp], &w[inp..2 * inp], 1e-5);
    close(&y.to_vec(), &want, 1e-4, "layer_norm");
    drop((y, want, tx, x));
    // A batch of matrices over the limit, one of them under it.
    let (bs, m, k, n) = (5, 1601, 4195, 3);
    big(&[bs, m, k]);
    let (a, bm) = (data(42, bs * m * k), data(43, k * n));
    let got =
        matmul::matmul_t(&Tensor::from_vec(&a, &[bs, m, k]), &Tensor::from_vec(&bm, &[k, n]), false, false);
    let b_rep: Vec<f32> = (0..bs).flat_map(|_| bm.iter().copied()).collect();
    close(
        &got.to_vec(),
        &matmul::matmul_cpu(&a, &b_rep, [bs, m, k, n], false, false),
        1e-3,
        "batched matmul over the limit",
    );
}

#[test]
fn caml_embedding_rows_split_past_the_limit() {
    // Projection embeddings [N, F, X, Y, Z] over the limit: the voxel rows of the unlabeled
    // samples (channels last), a selection of them, and the gradient back into the embedding.
    let shape = big(&[3, 16, 100, 100, 70]);
    let [_, f, ..] = shape[..] else { unreachable!() };
    let voxels = numel(&shape[2..]);
    let emb = data(44, numel(&shape));
    let e = Tensor::variable(&emb, &shape);
    let rows = e.narrow(0, 1, 2).permute(&[0, 2, 3, 4, 1]).reshape(&[2 * voxels, f]);
    let keep: Vec<f32> = (0..2 * voxels).map(|r| (r % 7 == 3) as u8 as f32).collect();
    let sel = scan::nonzero(&Tensor::from_vec(&keep, &[keep.len()]));
    let picked = rows.gather_rows(&sel);
    let sel = sel.to_u32();
    // Row r of sample 1 + s at voxel v is emb[1 + s, :, v].
    let row = |r: u32| {
        let (s, v) = (r as usize / voxels, r as usize % voxels);
        (0..f).map(move |c| ((1 + s) * f + c) * voxels + v)
    };
    let want: Vec<f32> = sel.iter().flat_map(|&r| row(r).map(|i| emb[i])).collect();
    assert_eq!(picked.to_vec(), want, "voxel rows");
    let model = Caml::new(f, 32, false, 45);
    let feats = model.projection_head1.forward(&picked, true);
    // The gradient reaching the picked rows, from the same head on a copy of them.
    let copy = Tensor::variable(&want, &[sel.len(), f]);
    let feats_copy = model.projection_head1.forward(&copy, true);
    let g_rows = backward(&weighted_sum(&feats_copy, 46)).remove(&copy).unwrap().to_vec();
    let g = backward(&weighted_sum(&feats, 46)).remove(&e).unwrap().to_vec();
    let mut want = vec![0f32; emb.len()];
    for (k, &r) in sel.iter().enumerate() {
        for (c, i) in row(r).enumerate() {
            want[i] = g_rows[k * f + c];
        }
    }
    close(&g, &want, 1e-5, "embedding gradient");
}

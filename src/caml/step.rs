//! One CAML training iteration (SPEC section 2, items 1-6): forward both networks, the three
//! losses, backward, SGD.

use anyhow::{Result, bail};

use crate::caml::losses::{consistency_loss, dice_loss};
use crate::caml::memory::MemoryBank;
use crate::caml::model::{Caml, Head, Outputs};
use crate::caml::omni;
use crate::config::{Method, TrainConfig};
use crate::data::sampler::Batch;
use crate::ops::scan::nonzero_many_with;
use crate::optim::{Sgd, SgdConfig};
use crate::rng::Rng;
use crate::rng::derive_seed;
use crate::tensor::Tensor;
use crate::{backward, no_grad};

/// The loss values of one iteration, read back once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepLog {
    pub iter: u64,
    pub loss: f32,
    pub loss_s: f32,
    pub loss_c: f32,
    pub loss_o: f32,
    pub lambda_c: f64,
    pub lambda_o: f64,
}

/// Everything a training run carries from one iteration to the next.
pub struct TrainState {
    pub model: Caml,
    pub opt: Sgd,
    pub bank: MemoryBank,
    /// Draws of the memory bank.
    pub rng: Rng,
    /// Iterations done.
    pub iter: u64,
    /// The last iteration's loss values while they are still on the device.
    pub pending: Option<Pending>,
}

impl TrainState {
    /// The state before the first iteration: `model`, SGD with the configuration's momentum and
    /// weight decay, an empty memory bank drawn from with `bank_seed`.
    pub fn new(model: Caml, cfg: &TrainConfig, bank_seed: u64) -> TrainState {
        let opt = Sgd::new(
            SgdConfig { lr: cfg.lr, momentum: cfg.momentum, weight_decay: cfg.weight_decay },
            &model.params(),
        );
        let bank = MemoryBank::new(cfg.labeled, cfg.memory_num, bank_capacity(cfg), cfg.embed);
        TrainState { model, opt, bank, rng: Rng::new(bank_seed), iter: 0, pending: None }
    }
}

/// The most rows a memory-bank entry holds: a patch's voxels (none without the memory bank).
pub fn bank_capacity(cfg: &TrainConfig) -> usize {
    if cfg.method == Method::Caml { cfg.patch.iter().product() } else { 0 }
}

/// An iteration whose loss values (loss, loss_s, loss_c, loss_o, the gradient sum) have not been
/// read yet: they come back with the next iteration's selection counts, or through [`flush`].
/// Its optimizer step was guarded on the device by the same values.
pub struct Pending {
    iter: u64,
    values: Tensor,
    lambda_c: f64,
    lambda_o: f64,
}

impl Pending {
    fn log(&self, v: &[f32]) -> Result<StepLog> {
        check_finite(self.iter, v)?;
        let (iter, lambda_c, lambda_o) = (self.iter, self.lambda_c, self.lambda_o);
        Ok(StepLog { iter, loss: v[0], loss_s: v[1], loss_c: v[2], loss_o: v[3], lambda_c, lambda_o })
    }
}

/// An error naming the first non-finite value among an iteration's loss values.
fn check_finite(iter: u64, v: &[f32]) -> Result<()> {
    for (name, value) in ["loss", "loss_s", "loss_c", "loss_o", "the gradients"].iter().zip(v) {
        if !value.is_finite() {
            bail!(
                "iteration {iter}: {name} is {value}; its optimizer step was not applied, so the weights and \
                 the last checkpoint are intact (try a lower --lr)"
            );
        }
    }
    Ok(())
}

/// Reads the pending iteration's loss values (one readback) and returns its log.
pub fn flush(st: &mut TrainState) -> Result<Option<StepLog>> {
    st.pending.take().map(|p| p.log(&p.values.to_vec())).transpose()
}

/// Rows [K, F] of an N, F, X, Y, Z embedding at the voxels `index` (flat over samples i..i + n,
/// each in X, Y, Z order): channels-last rows, or (`raw`) rows of the reference's flattening of
/// the N, C, X, Y, Z memory into rows of F consecutive values.
fn voxel_rows_at(emb: &Tensor, i: usize, n: usize, raw: bool, index: &Tensor) -> Tensor {
    if raw {
        let (f, s) = (emb.dim(1), emb.narrow(0, i, n));
        s.reshape(&[s.numel() / f, f]).gather_rows(index)
    } else {
        crate::ops::layout::gather_voxel_rows(emb, i, index)
    }
}

/// The voxel selections of items 3 and 4, found with one readback of their counts: per labeled
/// sample the voxels both decoders get right, of class 0 and of class 1; on the unlabeled samples
/// the voxels where the decoders agree, and those of them decoder 1 calls 0 and 1.
struct Selections {
    /// [2 i + c]: labeled sample i, class c.
    bank: Vec<Tensor>,
    /// Flat indices of the consistent unlabeled voxels (U32, increasing).
    consistent: Tensor,
    /// Positions of each unlabeled voxel among the consistent ones (U32).
    rank: Tensor,
    /// The consistent voxels decoder 1 calls 0, and 1 (flat indices).
    class: [Tensor; 2],
}

/// Also reads `previous`'s loss values back with the counts.
fn selections(out: &Outputs, label: &Tensor, l: usize, previous: Option<&Tensor>) -> (Selections, Vec<f32>) {
    no_grad(|| {
        let per_sample = label.numel() / l;
        let arg_v = out.out_v.argmax(1);
        let arg_a = out.out_a.argmax(1);
        let (lv, la) = (arg_v.narrow(0, 0, l), arg_a.narrow(0, 0, l));
        let correct = lv.eq(label).mul(&la.eq(label));
        let mut masks = Vec::new();
        for i in 0..l {
            let (c, g) = (
                correct.narrow(0, i, 1).reshape(&[per_sample]),
                label.narrow(0, i, 1).reshape(&[per_sample]),
            );
            masks.push(c.mul(&g.affine(-1.0, 1.0)));
            masks.push(c.mul(&g));
        }
        let u = arg_v.dim(0) - l;
        let (uv, ua) = (arg_v.narrow(0, l, u), arg_a.narrow(0, l, u));
        let n = uv.numel();
        let uv = uv.reshape(&[n]);
        let consistent = uv.eq(&ua.reshape(&[n]));
        let one = consistent.mul(&uv);
        let zero = consistent.sub(&one);
        let consistent_at = masks.len();
        masks.extend([consistent, zero, one]);
        let found = nonzero_many_with(&masks.iter().collect::<Vec<_>>(), previous);
        let mut idx = found.indices;
        if crate::gpu::rehearsing() {
            // Every voxel of a labeled sample is right, half of them of each class: the
            // bank's selections at their largest in number (each class alone can be larger, but
            // only its index, which has room for every voxel, depends on it).
            let half = per_sample / 2;
            for (i, sel) in idx[..consistent_at].iter_mut().enumerate() {
                *sel = sel.with_shape_unchecked(&[if i % 2 == 0 { half } else { per_sample - half }]);
            }
        }
        let class1 = idx.pop().unwrap();
        let class0 = idx.pop().unwrap();
        let consistent = idx.pop().unwrap();
        let rank = found.prefix_counts[consistent_at].clone();
        (Selections { bank: idx, consistent, rank, class: [class0, class1] }, found.values)
    })
}

/// Item 3: refresh the bank entries of the batch's labeled cases with the projected embeddings of
/// the voxels both decoders get right, then draw this iteration's memory.
fn update_memory_bank(
    st: &mut TrainState,
    cfg: &TrainConfig,
    out: &Outputs,
    sel: &Selections,
    cases: &[usize],
) -> [Option<Tensor>; 2] {
    no_grad(|| {
        for (i, &case) in cases.iter().enumerate() {
            let (i0, i1) = (&sel.bank[2 * i], &sel.bank[2 * i + 1]);
            let counts = [i0.numel(), i1.numel()];
            // A sample without a voxel both decoders get right empties its entry; the heads then
            // run on voxel 0 alone, so that the step's requests stay the same.
            let rows = if counts[0] + counts[1] == 0 {
                Tensor::from_u32(&[0], &[1])
            } else {
                Tensor::concat_u32(&[i0, i1])
            };
            let v = voxel_rows_at(&out.emb_v, i, 1, false, &rows);
            let a = voxel_rows_at(&out.emb_a, i, 1, !cfg.fix_memory_view, &rows);
            let pv = st.model.projection_head1.forward(&v, false);
            let pa = st.model.projection_head2.forward(&a, false);
            st.bank.update(case, pv.add(&pa).mul_scalar(0.5), counts);
        }
        st.bank.sample(&mut st.rng)
    })
}

/// Item 4: the omni-correlation loss on the unlabeled samples; None when it has nothing to compare.
/// Takes the outputs so that the embeddings are freed once their rows are gathered (with f16
/// storage nothing else holds them): this runs at the memory peak of the forward pass.
fn omni_correlation_term(
    st: &TrainState,
    cfg: &TrainConfig,
    out: Outputs,
    p_v: &Tensor,
    l: usize,
    s: &Selections,
    memory: &[Option<Tensor>; 2],
) -> Option<Tensor> {
    // BatchNorm1d in training mode needs more than one row; the reference runs the heads on any
    // more, with or without memory to compare with (their running statistics move).
    if s.consistent.numel() < 2 {
        return None;
    }
    let no_memory = memory.iter().all(|m| m.is_none());
    let u = out.out_v.dim(0) - l;
    let Outputs { emb_v, emb_a, .. } = out;
    let rows_v = voxel_rows_at(&emb_v, l, u, false, &s.consistent);
    let rows_a = voxel_rows_at(&emb_a, l, u, false, &s.consistent);
    drop((emb_v, emb_a));
    let m = &st.model;
    let pair = |rows: &Tensor, idx: &Tensor, second: bool| {
        let (proj, pred) = if second {
            (&m.projection_head2, &m.prediction_head2)
        } else {
            (&m.projection_head1, &m.prediction_head1)
        };
        Head::pair_rows_at(proj, pred, rows, idx)
    };
    let loss = if no_memory {
        None
    } else {
        let rows = no_grad(|| {
            let conf = p_v.narrow(0, l, u).max_axis(1);
            let conf = conf.reshape(&[conf.numel()]);
            omni::select_rows(&s.rank, [&s.class[0], &s.class[1]], &conf, cfg.num_filtered)
        });
        let feats: [&dyn Fn(&Tensor) -> Tensor; 2] =
            [&|idx| pair(&rows_v, idx, false), &|idx| pair(&rows_a, idx, true)];
        omni::omni_loss_at(feats, &rows, memory, cfg.corr_temperature, 2 * cfg.num_filtered)
    };
    if loss.is_none() {
        // No loss to compute the heads' output for: their statistics still move.
        no_grad(|| {
            let none = Tensor::empty_u32(&[0]);
            pair(&rows_v, &none, false);
            pair(&rows_a, &none, true);
        });
    }
    loss
}

/// One iteration on `batch`: forward, losses, backward, optimizer step. Returns the log of the
/// latest iteration whose values have been read: with CAML, the previous one (its values come
/// back with this iteration's selection counts, so that an iteration reads back once; this one
/// stays pending until the next step or [`flush`]); otherwise this one.
pub fn train_step(st: &mut TrainState, cfg: &TrainConfig, batch: &Batch) -> Result<Option<StepLog>> {
    let half = cfg.precision == crate::config::Precision::F16;
    let gpu = crate::gpu::gpu();
    gpu.begin_step();
    let log = crate::autograd::with_f16_storage(half, || step(st, cfg, batch));
    gpu.end_step();
    log
}

/// Rehearses an iteration of CAML on `batch` ([`crate::gpu::Gpu::rehearse`]): its buffers are
/// taken as they would be, with every voxel selection at its largest (all of the unlabeled
/// voxels consistent, and each class of them that large; every voxel of a labeled sample in
/// the memory bank), and nothing runs. The buffer pool plans the steps after it from its
/// requests, so that a run creates its buffers here rather than whenever a selection grows,
/// and reserves from its first iteration what its largest one needs. The state is left as it
/// was. Repeated while a rehearsal creates buffers (a first one also times the convolution
/// kernels it meets, which takes buffers of its own), at most three times; returns the buffers
/// created.
pub fn rehearse(st: &mut TrainState, cfg: &TrainConfig, batch: &Batch) -> Result<u64> {
    assert!(cfg.method == Method::Caml, "only CAML's selections vary from step to step");
    assert!(st.pending.is_none(), "a rehearsal with loss values unread");
    let gpu = crate::gpu::gpu();
    let before = gpu.allocations();
    for _ in 0..3 {
        let (iter, rng, counts) = (st.iter, st.rng.clone(), st.bank.counts());
        let made = gpu.allocations();
        let done = gpu.rehearse(|| train_step(st, cfg, batch));
        (st.iter, st.rng, st.pending) = (iter, rng, None);
        st.bank.restore_counts(counts);
        done?;
        if gpu.allocations() == made {
            break;
        }
    }
    Ok(gpu.allocations() - before)
}

fn step(st: &mut TrainState, cfg: &TrainConfig, batch: &Batch) -> Result<Option<StepLog>> {
    let iter = st.iter + 1;
    let [px, py, pz] = batch.patch;
    let l = batch.indices.labeled.len();
    let n = if cfg.method == Method::LabeledOnly { l } else { l + batch.indices.unlabeled.len() };
    let vox = px * py * pz;
    let x = Tensor::from_vec(&batch.images[..n * vox], &[n, 1, px, py, pz]);
    let labels: Vec<f32> = batch.labels[..l * vox].iter().map(|&v| v as f32).collect();
    let label = Tensor::from_vec(&labels, &[l, 1, px, py, pz]);
    let out = st.model.forward(&x, Some(derive_seed(cfg.seed, iter)));
    let p_v = out.out_v.softmax(1);
    let p_a = out.out_a.softmax(1);

    let fg = |p: &Tensor| p.narrow(0, 0, l).narrow(1, 1, 1);
    let loss_s = dice_loss(&fg(&p_v), &label).add(&dice_loss(&fg(&p_a), &label));
    let ramp = crate::caml::losses::Ramp {
        consistency: cfg.consistency,
        omni: cfg.omni,
        length: cfg.ramp_length(),
        every: cfg.ramp_every,
    };
    let (lambda_c, lambda_o) = ramp.weights(iter);
    let mut loss = loss_s.mul_scalar(0.5);
    let mut parts = vec![loss_s];
    if cfg.method != Method::LabeledOnly {
        let loss_c = consistency_loss(&p_v, &p_a, cfg.temperature, cfg.detach_targets);
        loss = loss.add(&loss_c.mul_scalar(lambda_c as f32));
        parts.push(loss_c);
    } else {
        parts.push(Tensor::zeros(&[1]));
    }
    let mut previous = None;
    let loss_o = if cfg.method == Method::Caml {
        let pending = st.pending.take();
        let (sel, values) = selections(&out, &label, l, pending.as_ref().map(|p| &p.values));
        previous = pending.map(|p| p.log(&values)).transpose()?;
        let memory = update_memory_bank(st, cfg, &out, &sel, &batch.indices.labeled);
        omni_correlation_term(st, cfg, out, &p_v, l, &sel, &memory)
    } else {
        drop(out);
        None
    };
    match loss_o {
        Some(lo) => {
            loss = loss.add(&lo.mul_scalar(lambda_o as f32));
            parts.push(lo);
        }
        None => parts.push(Tensor::zeros(&[1])),
    }
    let grads = backward(&loss);
    let params = st.model.params();
    // The loss parts and a sum over every gradient, non-finite if any entry is (the gradients
    // copied end to end, then one reduction rather than one per parameter).
    let values = no_grad(|| {
        let mut all = vec![loss.reshape(&[1])];
        all.extend(parts.iter().map(|p| p.reshape(&[1])));
        let present: Vec<&Tensor> = params.iter().filter_map(|p| grads.get(p)).collect();
        let flat = Tensor::empty(&[present.iter().map(|g| g.numel()).sum::<usize>().max(1)]);
        let mut offset = 0;
        for g in present {
            crate::gpu::gpu().copy(g.buffer(), 0, flat.buffer(), offset, g.bytes());
            offset += g.bytes();
        }
        all.push(if offset == 0 { Tensor::zeros(&[1]) } else { flat.sum_all().reshape(&[1]) });
        Tensor::concat(&all, 0)
    });
    let this = Pending { iter, values, lambda_c, lambda_o };
    if cfg.method == Method::Caml {
        st.opt.step_guarded(&params, &grads, &this.values);
        // A GPU runs the backward pass and the update while the host records the next
        // iteration's forward pass, up to the readback of its selection counts. (A software
        // device runs on the host's cores, and there a submission in flight stalls the recording:
        // one submission per iteration is faster.)
        if !crate::gpu::gpu().is_software() {
            crate::gpu::gpu().flush();
        }
        st.iter = iter;
        st.pending = Some(this);
        return Ok(previous);
    }
    let log = this.log(&this.values.to_vec())?;
    st.opt.step(&params, &grads);
    st.iter = iter;
    Ok(Some(log))
}

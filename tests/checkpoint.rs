//! Checkpoint files: round trip, atomic replacement, and clear errors for files that do not match.

use caml_wgpu::Tensor;
use caml_wgpu::checkpoint::{self, Entry, StateDict};
use std::collections::HashMap;

fn dict() -> StateDict {
    let mut d = StateDict::new();
    d.insert("encoder1.block_one.conv.0.weight".into(), Entry::f32(&[2, 1, 1, 1, 1], vec![0.5, -1.25]));
    d.insert("encoder1.block_one.conv.1.num_batches_tracked".into(), Entry::i64(&[], vec![7]));
    d
}

#[test]
fn state_dict_round_trips_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let meta = HashMap::from([("width".to_string(), "16".to_string())]);
    checkpoint::save(&path, &dict(), &meta).unwrap();
    let (back, m) = checkpoint::load(&path).unwrap();
    assert_eq!(back, dict());
    assert_eq!(m, meta);
    // Rewriting replaces the file and leaves no temporary behind.
    checkpoint::save(&path, &dict(), &HashMap::new()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn mismatched_checkpoints_list_every_problem() {
    let path = std::path::Path::new("ck.safetensors");
    let expected = vec![
        ("encoder1.block_one.conv.0.weight".to_string(), vec![16, 1, 3, 3, 3]),
        ("encoder1.block_one.conv.0.bias".to_string(), vec![16]),
    ];
    let mut d = dict();
    d.insert("stray".into(), Entry::f32(&[1], vec![0.0]));
    let err = checkpoint::check_against(path, &d, &expected).unwrap_err().to_string();
    assert!(err.contains("ck.safetensors"), "{err}");
    assert!(err.contains("missing (1): encoder1.block_one.conv.0.bias"), "{err}");
    assert!(err.contains("unexpected (2)"), "{err}");
    assert!(err.contains("wrong shape (1): encoder1.block_one.conv.0.weight"), "{err}");
}

#[test]
fn corrupt_and_truncated_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    checkpoint::save(&path, &dict(), &HashMap::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = format!("{:#}", checkpoint::load(&path).unwrap_err());
    assert!(err.contains("bad.safetensors"), "{err}");
    std::fs::write(&path, b"not a checkpoint at all").unwrap();
    assert!(format!("{:#}", checkpoint::load(&path).unwrap_err()).contains("bad.safetensors"));
    let missing = dir.path().join("nope.safetensors");
    assert!(format!("{:#}", checkpoint::load(&missing).unwrap_err()).contains("nope.safetensors"));
}

/// The weights of a width-2 network, as `train` saves them.
fn tiny_model() -> (caml_wgpu::config::TrainConfig, StateDict) {
    use caml_wgpu::config::{Preset, TrainConfig};
    let cfg = TrainConfig { width: 2, embed: 4, patch: [16, 16, 16], ..TrainConfig::preset(Preset::Small) };
    let model = caml_wgpu::train::build_model(&cfg);
    let (p, b) = model.named();
    let dict = p
        .iter()
        .chain(&b)
        .map(|(k, t)| {
            let e = match t.dtype() {
                caml_wgpu::DType::F32 => Entry::f32(t.shape(), t.to_vec()),
                caml_wgpu::DType::U32 => {
                    Entry::i64(t.shape(), t.to_u32().into_iter().map(i64::from).collect())
                }
            };
            (k.clone(), e)
        })
        .collect();
    (cfg, dict)
}

#[test]
fn a_model_file_with_missing_extra_and_misshaped_tensors_is_one_error_listing_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (cfg, mut d) = tiny_model();
    let meta = caml_wgpu::train::model_metadata(&cfg);
    checkpoint::save(&path, &d, &meta).unwrap();
    caml_wgpu::train::load_model(&path, &cfg).unwrap();

    d.remove("decoder1.out_conv.bias").unwrap();
    d.insert("stray.weight".into(), Entry::f32(&[1], vec![0.0]));
    let w = d.get_mut("encoder1.block_one.conv.0.weight").unwrap();
    w.shape = vec![w.shape.iter().product()];
    checkpoint::save(&path, &d, &meta).unwrap();
    let err = format!("{:#}", caml_wgpu::train::load_model(&path, &cfg).err().unwrap());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("missing (1): decoder1.out_conv.bias"), "{err}");
    assert!(err.contains("unexpected (1): stray.weight"), "{err}");
    assert!(err.contains("wrong shape (1): encoder1.block_one.conv.0.weight: file has [54]"), "{err}");
}

#[test]
fn non_finite_weights_and_a_width_the_file_cannot_hold_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (cfg, mut d) = tiny_model();
    let meta = caml_wgpu::train::model_metadata(&cfg);
    if let checkpoint::Data::F32(v) = &mut d.get_mut("decoder2.out_conv.weight").unwrap().data {
        v[3] = f32::NAN;
    }
    checkpoint::save(&path, &d, &meta).unwrap();
    let err = format!("{:#}", caml_wgpu::train::load_model(&path, &cfg).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("decoder2.out_conv.weight"), "{err}");
    assert!(err.contains("non-finite value at entry 3"), "{err}");

    // A configuration claiming a network far larger than the weights is refused before the
    // network is built (width 100000 would need terabytes).
    let bomb = caml_wgpu::config::TrainConfig { width: 100_000, ..cfg.clone() };
    let (_, d) = tiny_model();
    checkpoint::save(&path, &d, &caml_wgpu::train::model_metadata(&bomb)).unwrap();
    let err = format!("{:#}", caml_wgpu::train::load_model(&path, &cfg).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("width 100000"), "{err}");
    assert!(
        caml_wgpu::train::min_model_values(2, 4)
            <= d.values().map(|e| e.shape.iter().product::<usize>() as u64).sum()
    );
}

#[test]
fn a_training_state_saved_for_another_run_is_refused_before_anything_is_loaded() {
    use caml_wgpu::caml::{memory::MemoryBank, step::TrainState};
    use caml_wgpu::optim::{Sgd, SgdConfig};
    use caml_wgpu::rng::Rng;
    let state = |cfg: &caml_wgpu::config::TrainConfig| {
        let model = caml_wgpu::train::build_model(cfg);
        let opt = Sgd::new(SgdConfig { lr: cfg.lr, momentum: 0.9, weight_decay: 0.0 }, &model.params());
        TrainState {
            model,
            opt,
            bank: MemoryBank::new(
                cfg.labeled,
                cfg.memory_num,
                caml_wgpu::caml::step::bank_capacity(cfg),
                cfg.embed,
            ),
            rng: Rng::new(1),
            iter: 0,
            pending: None,
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = tiny_model();
    let cfg = caml_wgpu::config::TrainConfig { labeled: 2, labeled_bs: 1, batch: 2, ..cfg };
    let mut saved = state(&cfg);
    saved.iter = 7;
    let sampler = caml_wgpu::data::sampler::Sampler::new(5, 2, 1, 1, 3).unwrap();
    caml_wgpu::train::save_checkpoint(dir.path(), &saved, &cfg, &sampler.state()).unwrap();
    let mut st = state(&cfg);
    caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &cfg, 5).unwrap();
    assert_eq!(st.iter, 7);
    // A resume may extend the run or move its data, but not change how it trains.
    let extended =
        caml_wgpu::config::TrainConfig { iters: 99, data: Some("elsewhere".into()), ..cfg.clone() };
    caml_wgpu::train::restore_checkpoint(dir.path(), &mut state(&cfg), &extended, 5).unwrap();
    let changed = caml_wgpu::config::TrainConfig { lr: 0.5, seed: 4, rampup: Some(3.0), ..cfg.clone() };
    let mut st = state(&cfg);
    let e = format!(
        "{:#}",
        caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &changed, 5).err().unwrap()
    );
    assert!(e.contains("lr = ") && e.contains("(this run: 0.5)"), "{e}");
    assert!(e.contains("seed = ") && e.contains("(this run: 4)"), "{e}");
    assert!(e.contains("rampup = unset (this run: 3.0)") && e.contains("--config"), "{e}");
    assert!(!e.contains("iters"), "{e}");
    assert_eq!(st.iter, 0);
    // A checkpoint saved before a setting existed: that setting is not compared, the others are.
    let file = dir.path().join(caml_wgpu::train::CHECKPOINT);
    let (dict, mut meta) = caml_wgpu::checkpoint::load(&file).unwrap();
    let text = meta["config"].lines().filter(|l| !l.starts_with("intensity_aug")).collect::<Vec<_>>();
    meta.insert("config".into(), text.join("\n"));
    caml_wgpu::checkpoint::save(&file, &dict, &meta).unwrap();
    let flipped = caml_wgpu::config::TrainConfig { intensity_aug: !cfg.intensity_aug, ..cfg.clone() };
    caml_wgpu::train::restore_checkpoint(dir.path(), &mut state(&cfg), &flipped, 5).unwrap();
    let e = format!(
        "{:#}",
        caml_wgpu::train::restore_checkpoint(dir.path(), &mut state(&cfg), &changed, 5).err().unwrap()
    );
    assert!(e.contains("lr = ") && !e.contains("intensity_aug"), "{e}");

    // Another number of training cases, or of labeled samples per batch.
    let mut st = state(&cfg);
    let e =
        format!("{:#}", caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &cfg, 6).err().unwrap());
    assert!(e.contains("checkpoint.safetensors") && e.contains("saved for 5 training cases"), "{e}");
    assert_eq!(st.iter, 0);
    let other = caml_wgpu::config::TrainConfig { batch: 3, ..cfg.clone() };
    let e =
        format!("{:#}", caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &other, 5).err().unwrap());
    assert!(e.contains("in batches of 1 + 1") && e.contains("1 + 2"), "{e}");
    // Another embedding width: the heads and their momentum, listed in one error.
    let wide = caml_wgpu::config::TrainConfig { embed: 8, ..cfg.clone() };
    let mut st = state(&wide);
    let e =
        format!("{:#}", caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &wide, 5).err().unwrap());
    assert!(
        e.contains("wrong shape (") && e.contains("prediction_head1.0.bias: file has [4], model expects [8]"),
        "{e}"
    );
    assert!(e.contains("optim/prediction_head1.0.weight: file has [4, 4], model expects [8, 8]"), "{e}");
    assert_eq!(st.iter, 0);

    // A memory-bank entry of more rows than this run's patch has voxels.
    let mut saved = state(&cfg);
    let rows: Vec<f32> = (0..10 * cfg.embed).map(|i| i as f32 * 0.25).collect();
    saved.bank.update(1, Tensor::from_vec(&rows, &[10, cfg.embed]), [6, 4]);
    caml_wgpu::train::save_checkpoint(dir.path(), &saved, &cfg, &sampler.state()).unwrap();
    let mut st = state(&cfg);
    caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &cfg, 5).unwrap();
    let (back, counts) = st.bank.entry(1).expect("entry 1 restored");
    assert_eq!((back.to_vec(), counts, st.bank.entry(0).is_none()), (rows, [6, 4], true));
    let small = caml_wgpu::config::TrainConfig { patch: [2, 2, 2], ..cfg.clone() };
    let mut st = state(&small);
    let e =
        format!("{:#}", caml_wgpu::train::restore_checkpoint(dir.path(), &mut st, &small, 5).err().unwrap());
    assert!(e.contains("memory-bank entry 1 holds 10 rows, more than the 8 voxels of a patch"), "{e}");
    assert!(st.bank.entry(1).is_none());
}

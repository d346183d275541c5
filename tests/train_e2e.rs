//! Training end to end at a tiny size: finite losses, weights that reload to identical outputs,
//! and a resumed run that reproduces the uninterrupted one.

use std::path::{Path, PathBuf};

use caml_wgpu::Tensor;
use caml_wgpu::config::{LrSchedule, Method, Precision, Preset, TrainConfig};
use caml_wgpu::data::synth::{SynthSpec, generate_dataset};
use caml_wgpu::train;

fn dataset(dir: &Path) -> PathBuf {
    generate_dataset(dir.join("data"), &SynthSpec::new(8, 5, [24, 24, 20])).unwrap()
}

fn tiny(data: &Path, method: Method) -> TrainConfig {
    TrainConfig {
        data: Some(data.to_path_buf()),
        method,
        labeled: 2,
        iters: 4,
        patch: [16, 16, 16],
        width: 2,
        embed: 8,
        memory_num: 16,
        num_filtered: 64,
        ramp_every: 1,
        val_every: 0,
        checkpoint_every: 2,
        ..TrainConfig::preset(Preset::Small)
    }
}

fn log_rows(run: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("log.csv")).unwrap();
    // Every column but the wall-clock seconds.
    text.lines().skip(1).map(|l| l.split(',').take(8).map(|v| v.parse().unwrap()).collect()).collect()
}

#[test]
fn f16_storage_trains_like_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = |precision| {
        let out = dir.path().join(format!("{precision:?}"));
        let cfg = TrainConfig { iters: 3, precision, ..tiny(&data, Method::Caml) };
        train::train(&cfg, &out, false).unwrap();
        log_rows(&out)
    };
    let (full, half) = (run(Precision::F32), run(Precision::F16));
    // Iteration 1 is computed before any update: f16 storage changes only the gradients.
    assert_eq!(full[0], half[0]);
    for (a, b) in full.iter().zip(&half).skip(1) {
        assert!(b.iter().all(|v| v.is_finite()), "{b:?}");
        assert!(
            (a[2] - b[2]).abs() <= 0.05 * a[2].abs(),
            "loss_s {} with f32 storage, {} with f16",
            a[2],
            b[2]
        );
    }
}

#[test]
fn every_method_trains_with_finite_losses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    for method in [Method::Caml, Method::Mutual, Method::LabeledOnly] {
        let run = dir.path().join(format!("{method:?}"));
        let last = train::train(&TrainConfig { iters: 3, ..tiny(&data, method) }, &run, false).unwrap();
        assert_eq!(last.iter, 3);
        for (i, row) in log_rows(&run).iter().enumerate() {
            assert_eq!(row[0], i as f64 + 1.0);
            assert!(row[1..].iter().all(|v| v.is_finite()), "{method:?}: {row:?}");
        }
        assert!(run.join(train::FINAL_MODEL).exists() && run.join("loss.png").exists());
        if method == Method::LabeledOnly {
            assert!(
                log_rows(&run).iter().all(|r| r[3] == 0.0 && r[4] == 0.0),
                "labeled-only has loss_s only"
            );
        }
    }
}

#[test]
fn saved_weights_reload_to_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = TrainConfig { iters: 2, ..tiny(&data, Method::Caml) };
    let run = dir.path().join("run");
    train::train(&cfg, &run, false).unwrap();
    // Two independent loads of the same file agree with each other and differ from a fresh model.
    let (a, _) = train::load_model(&run.join(train::FINAL_MODEL), &cfg).unwrap();
    let (b, saved) =
        train::load_model(&run.join(train::FINAL_MODEL), &TrainConfig::preset(Preset::Paper)).unwrap();
    assert_eq!((saved.width, saved.patch), (2, [16, 16, 16]), "the file carries its configuration");
    let x =
        Tensor::from_vec(&caml_wgpu::rng::Rng::new(3).vec(2 * 16 * 16 * 16, -1.0, 1.0), &[2, 1, 16, 16, 16]);
    let (ya, yb) = (a.forward_v(&x).to_vec(), b.forward_v(&x).to_vec());
    assert_eq!(ya, yb);
    let fresh = train::build_model(&cfg).forward_v(&x).to_vec();
    assert_ne!(ya, fresh);
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // The run is stopped by a smaller --iters, which would change a poly schedule (it spans the
    // run); a poly run killed and resumed with the same --iters is in tests/kill_resume.rs.
    let cfg = TrainConfig { lr_schedule: LrSchedule::Constant, ..tiny(&data, Method::Caml) };
    let full = dir.path().join("full");
    train::train(&cfg, &full, false).unwrap();
    let part = dir.path().join("part");
    train::train(&TrainConfig { iters: 2, ..cfg.clone() }, &part, false).unwrap();
    train::train(&cfg, &part, true).unwrap();
    let (a, b) = (log_rows(&full), log_rows(&part));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "uninterrupted {ra:?} vs resumed {rb:?}");
        }
    }
}

/// `caml-wgpu train` at a tiny size on `data` into `out`, with `extra` arguments.
fn tiny_train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .args(["train", "--preset", "small", "--labeled", "2", "--width", "2", "--patch", "16", "16", "16"])
        .args(["--memory-num", "16", "--num-filtered", "64", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn validation_rows(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("validation.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').next().unwrap().to_string()).collect()
}

#[test]
fn a_run_folder_holds_one_run_and_a_resume_drops_what_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    assert_eq!(train::earlier_run(&run), None);
    let cfg = TrainConfig { iters: 3, val_every: 1, checkpoint_every: 1, ..tiny(&data, Method::Caml) };
    train::train(&TrainConfig { iters: 2, ..cfg.clone() }, &run, false).unwrap();
    assert_eq!(validation_rows(&run), ["1", "2"]);
    let earlier = train::earlier_run(&run).unwrap();
    assert!(
        earlier.contains("checkpoint.safetensors") && earlier.ends_with("logged to iteration 2"),
        "{earlier}"
    );
    // A validation that a killed run wrote after its last checkpoint: the resumed run repeats it.
    let mut f = std::fs::OpenOptions::new().append(true).open(run.join("validation.csv")).unwrap();
    std::io::Write::write_all(&mut f, b"3,0.123456\n").unwrap();
    drop(f);
    train::train(&cfg, &run, true).unwrap();
    assert_eq!(validation_rows(&run), ["1", "2", "3"]);
    assert!(!std::fs::read_to_string(run.join("validation.csv")).unwrap().contains("0.123456"));
    // Resuming a finished run trains nothing, rewrites nothing and reports its last logged step.
    let files = ["log.csv", "validation.csv", train::CHECKPOINT, train::FINAL_MODEL];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(run.join(f)).unwrap()).collect();
    let last = train::train(&cfg, &run, true).unwrap();
    let row = log_rows(&run).pop().unwrap();
    assert_eq!((last.iter, last.loss, last.loss_o), (3, row[1] as f32, row[4] as f32));
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(run.join(f)).unwrap(), b, "{f} rewritten");
    }
    // A new run in the folder replaces the earlier one's files: one validation history, one log.
    train::train(&TrainConfig { iters: 1, ..cfg.clone() }, &run, false).unwrap();
    assert_eq!(validation_rows(&run), ["1"]);
    assert_eq!(log_rows(&run).len(), 1);
}

#[test]
fn train_refuses_a_folder_with_an_earlier_run_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    train::train(&TrainConfig { iters: 1, ..tiny(&data, Method::Caml) }, &run, false).unwrap();
    let before = std::fs::read(run.join(train::FINAL_MODEL)).unwrap();
    let cli =
        |extra: &[&str]| tiny_train(&data, &run, &[&["--iters", "1", "--val-every", "0"], extra].concat());
    let refused = cli(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("holds an earlier run") && stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(std::fs::read(run.join(train::FINAL_MODEL)).unwrap(), before, "the earlier run was touched");
    let replaced = cli(&["--overwrite"]);
    assert!(replaced.status.success(), "{}", String::from_utf8_lossy(&replaced.stderr));
    assert_eq!(log_rows(&run).len(), 1);
}

#[test]
fn raw_scans_with_normalize_train_and_predict_as_prepared_ones_do() {
    use caml_wgpu::data::nifti_io::{read_image, write_image};
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // The same cases at scanner-like intensities.
    let raw = dir.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let from = entry.unwrap().path();
        let to = raw.join(from.file_name().unwrap());
        if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            std::fs::copy(from.join("label.nii.gz"), to.join("label.nii.gz")).unwrap();
            let image = read_image(from.join("image.nii.gz")).unwrap();
            write_image(to.join("image.nii.gz"), &image.map(|v| v * 300.0 + 800.0)).unwrap();
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let cfg = TrainConfig { iters: 1, ..tiny(&data, Method::Caml) };
    let raw_cfg = TrainConfig { data: Some(raw.clone()), normalize: true, ..cfg.clone() };
    let (prepared_run, raw_run) = (dir.path().join("prepared"), dir.path().join("raw-run"));
    train::train(&cfg, &prepared_run, false).unwrap();
    train::train(&raw_cfg, &raw_run, false).unwrap();
    // Iteration 1 runs before any update: the same inputs up to rounding give the same losses.
    let (a, b) = (log_rows(&prepared_run).remove(0), log_rows(&raw_run).remove(0));
    for (x, y) in a[1..4].iter().zip(&b[1..4]) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "prepared {a:?} vs raw, normalised {b:?}");
    }
    // The model file records it: predict z-normalises a raw scan for it without being told, and
    // warns about a raw scan given to a model that reads its images as stored.
    let (_, saved) = train::load_model(&raw_run.join(train::FINAL_MODEL), &cfg).unwrap();
    assert!(saved.normalize);
    let predict = |run: &Path, input: &Path, out: &str| {
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .args(["predict", "--save-probabilities", "-i", input.to_str().unwrap(), "--checkpoint"])
            .arg(run.join(train::FINAL_MODEL))
            .arg("-o")
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        let prob = read_image(dir.path().join(format!("{}_prob.nii.gz", out.trim_end_matches(".nii.gz"))));
        (prob.unwrap(), String::from_utf8_lossy(&res.stderr).into_owned())
    };
    let (from_raw, stderr) = predict(&raw_run, &raw.join("synth_000/image.nii.gz"), "a.nii.gz");
    assert!(!stderr.contains("not z-normalised"), "{stderr}");
    let (from_prepared, _) = predict(&raw_run, &data.join("synth_000/image.nii.gz"), "b.nii.gz");
    for (x, y) in from_raw.data().iter().zip(from_prepared.data()) {
        assert!((x - y).abs() < 1e-3, "{x} from the raw scan, {y} from the prepared one");
    }
    let (_, stderr) = predict(&prepared_run, &raw.join("synth_000/image.nii.gz"), "c.nii.gz");
    assert!(stderr.contains("not z-normalised") && stderr.contains("--normalize"), "{stderr}");
    // A resume must read the images as the run did.
    let err = format!(
        "{:#}",
        train::train(&TrainConfig { normalize: false, ..raw_cfg }, &raw_run, true).unwrap_err()
    );
    assert!(err.contains("normalize = true (this run: false)") && err.contains("config.toml"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // A learning rate this large overflows the weights' statistics within a step or two.
    let cfg = TrainConfig { lr: 1e30, iters: 6, checkpoint_every: 1, ..tiny(&data, Method::Caml) };
    let run = dir.path().join("run");
    let err = format!("{:#}", train::train(&cfg, &run, false).unwrap_err());
    assert!(err.contains("iteration") && err.contains("optimizer step"), "{err}");
    let failed_at: u64 = err.split_whitespace().nth(1).unwrap().trim_end_matches(':').parse().unwrap();
    assert!(failed_at >= 2, "{err}");
    // The checkpoint on disk is the last complete iteration's, and it loads (all values finite).
    let (_, meta) = caml_wgpu::checkpoint::load(&run.join(train::CHECKPOINT)).unwrap();
    assert_eq!(meta["iteration"], (failed_at - 1).to_string());
    train::load_model(&run.join(train::CHECKPOINT), &cfg).unwrap();
}

#[test]
fn a_non_finite_loss_found_with_the_next_iterations_readback_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // No checkpoint or validation between iterations: an iteration's values are read with the
    // next one's selection counts, and its optimizer step was guarded on the device meanwhile.
    let cfg =
        TrainConfig { lr: 1e30, iters: 6, checkpoint_every: 0, val_every: 0, ..tiny(&data, Method::Caml) };
    let run = dir.path().join("run");
    let err = format!("{:#}", train::train(&cfg, &run, false).unwrap_err());
    assert!(err.contains("optimizer step was not applied"), "{err}");
    let failed_at: u64 = err.split_whitespace().nth(1).unwrap().trim_end_matches(':').parse().unwrap();
    assert!((1..=6).contains(&failed_at), "{err}");
    let logged = log_rows(&run).len() as u64;
    assert_eq!(logged, failed_at - 1, "every iteration before the failing one is logged, and no other");
    assert!(!run.join(train::CHECKPOINT).exists(), "nothing was saved");
}

#[test]
fn validation_names_a_model_that_predicts_no_foreground() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(&dataset(dir.path()), Method::Caml);
    let cases =
        caml_wgpu::data::dataset::Dataset::open(cfg.data.as_ref().unwrap()).unwrap().load_test().unwrap();
    let model = train::build_model(&cfg);
    // Decoder 1's output bias far on the background side: every voxel is background.
    let (params, _) = model.named();
    let bias = &params.iter().find(|(k, _)| k == "decoder1.out_conv.bias").unwrap().1;
    let set = |v: [f32; 2]| caml_wgpu::gpu::gpu().upload(bias.buffer(), 0, bytemuck::cast_slice(&v));
    set([20.0, -20.0]);
    let v = train::mean_dice(&model, &cases, cfg.patch).unwrap();
    assert_eq!((v.dice, v.cases, v.empty), (0.0, cases.len(), cases.len()));
    assert!(v.line(7).contains(&format!("no foreground predicted on {n} of {n} cases", n = cases.len())));
    assert!(v.line(7).contains("collapsed to background"));
    // Towards foreground: every case has some, and the line says nothing more.
    set([-20.0, 20.0]);
    let v = train::mean_dice(&model, &cases, cfg.patch).unwrap();
    assert_eq!(v.empty, 0);
    assert!(v.dice > 0.0);
    assert_eq!(
        v.line(7),
        format!("iteration 7: validation Dice {:.4} on {} test cases", v.dice, cases.len())
    );
}

#[test]
fn validation_lines_reach_output_that_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = tiny_train(&data, &dir.path().join("run"), &["--iters", "2", "--val-every", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for iter in [1, 2] {
        assert!(text.contains(&format!("iteration {iter}: validation Dice ")), "{text}");
    }
    // The pool's account of the run: its peak and what the steps after the rehearsal allocated.
    let line = text.lines().find(|l| l.starts_with("GPU memory: peak ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("MiB reserved by the buffer pool"), "{line}");
    assert!(line.contains("buffers created in the 2 steps after a rehearsal of the largest step"), "{line}");
}

#[test]
fn bench_times_the_step_from_a_runs_checkpoint_on_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    train::train(&tiny(&data, Method::Caml), &run, false).unwrap();
    let bench = |run: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .args(["bench", "train-step", "--iters", "1", "--run"])
            .arg(run)
            .output()
            .unwrap()
    };
    let out = bench(&run);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // The run's configuration, not the preset's, and its state at the last checkpoint.
    assert!(text.contains(&format!("from {} at iteration 4, its next batch", run.display())), "{text}");
    assert!(text.contains("train step, Small preset (width 2, patch [16, 16, 16], batch 4"), "{text}");
    // A folder without a run is an error that names what is missing.
    let out = bench(dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.path().join("config.toml").display().to_string()), "{err}");
}

#[test]
fn a_dry_run_bench_reports_the_largest_steps_memory_without_running_it() {
    let bench = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .args(["bench", "train-step", "--width", "2", "--patch", "16", "16", "16", "--batch", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.starts_with("rehearsed train step")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("patch [16, 16, 16], batch 2") && line.contains("nothing run: "), "{line}");
    let mib: f64 = line.split("peak ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(mib > 0.0, "{line}");
    // Nothing is timed.
    assert!(!text.contains("per iteration"), "{text}");
    assert!(!bench(&["--dry-run", "--iters", "2"]).status.success());
}

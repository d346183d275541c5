//! Training configuration: presets, TOML files over presets, validation messages.

use caml_wgpu::config::{LrSchedule, Method, Preset, TrainConfig};

#[test]
fn paper_preset_matches_the_reference() {
    let c = TrainConfig::preset(Preset::Paper);
    assert_eq!((c.width, c.patch, c.batch, c.labeled_bs), (16, [112, 112, 80], 4, 2));
    assert_eq!((c.iters, c.seed, c.memory_num, c.num_filtered), (15_000, 1337, 256, 12_800));
    assert_eq!((c.lr, c.momentum, c.weight_decay), (0.01, 0.9, 1e-4));
    assert_eq!(c.ramp_length(), 20.0);
    assert_eq!(TrainConfig { labeled: 4, ..c.clone() }.ramp_length(), 40.0);
    assert_eq!(TrainConfig { labeled: 16, ..c.clone() }.ramp_length(), 15.0);
    assert_eq!(c.lr_schedule, LrSchedule::Constant);
    assert_eq!((c.lr_at(1), c.lr_at(15_000)), (0.01, 0.01));
    assert_eq!((c.dropout, c.detach_targets, c.intensity_aug), (0.5, false, false));
    // The small preset leaves out dropout, detaches the targets and adds intensity augmentation;
    // a file without these keys (a run folder written before they existed) reads as the
    // reference.
    let small = TrainConfig::preset(Preset::Small);
    assert_eq!((small.dropout, small.detach_targets, small.intensity_aug), (0.0, true, true));
    let old = toml::from_str::<TrainConfig>("iters = 5").unwrap();
    assert_eq!((old.dropout, old.intensity_aug), (0.5, false));
}

#[test]
fn poly_schedule_follows_its_formula() {
    let c = TrainConfig { lr_schedule: LrSchedule::Poly, lr: 0.1, iters: 100, ..TrainConfig::default() };
    // Iteration 1 takes the base rate; iteration i takes lr * (1 - (i - 1) / iters)^0.9.
    assert_eq!(c.lr_at(1), 0.1);
    assert!((c.lr_at(51) - 0.1 * 0.5f32.powf(0.9)).abs() < 1e-7);
    assert!((c.lr_at(100) - 0.1 * 0.01f32.powf(0.9)).abs() < 1e-7);
    assert!(c.lr_at(100) > 0.0 && c.lr_at(101) == 0.0);
    let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back.lr_schedule, LrSchedule::Poly);
    assert!(toml::from_str::<TrainConfig>("lr_schedule = \"cosine\"").is_err());
}

#[test]
fn toml_file_overrides_only_what_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "iters = 50\nmethod = \"mutual\"\npatch = [32, 32, 16]\n").unwrap();
    let c = TrainConfig::preset(Preset::Small).merge_file(&path).unwrap();
    assert_eq!((c.iters, c.method, c.patch), (50, Method::Mutual, [32, 32, 16]));
    assert_eq!(c.width, TrainConfig::preset(Preset::Small).width);
    // The resolved config written to a run folder reads back identically.
    let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn bad_config_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (text, needle) in [
        ("iters = \"many\"", "invalid training configuration"),
        ("itres = 5", "invalid training configuration"),
        ("patch = [30, 32, 32]", "multiple of 16"),
        ("iters = [", "not valid TOML"),
        // Values that would stop or corrupt a run long after it started.
        ("rampup = -1.0", "rampup"),
        ("ramp_every = 0", "ramp_every"),
        ("temperature = nan", "temperatures"),
        ("corr_temperature = -inf", "temperatures"),
        ("momentum = nan", "momentum"),
        ("weight_decay = -1.0", "weight_decay"),
        ("omni = nan", "loss weights"),
        ("dropout = 1.0", "dropout"),
        ("dropout = -0.1", "dropout"),
        ("dropout = nan", "dropout"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", TrainConfig::preset(Preset::Paper).merge_file(&path).unwrap_err());
        assert!(err.contains("bad.toml") && err.contains(needle), "{text}: {err}");
    }
}

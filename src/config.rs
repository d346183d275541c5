//! Training configuration: the paper's preset, a small preset for software devices, TOML files.
//! Precedence: preset, then the config file, then command-line flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Both networks, CMA, the memory bank and the omni-correlation loss.
    Caml,
    /// loss_s and loss_c only: no CMA, no omni-correlation.
    Mutual,
    /// loss_s on the labeled cases only.
    LabeledOnly,
}

/// How the learning rate changes over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The paper's: `lr` throughout.
    #[default]
    Constant,
    /// `lr * (1 - i / iters)^0.9` at 0-based iteration i, as nnU-Net and the MC-Net family use.
    Poly,
}

/// How the activations that the backward pass reads are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// As computed.
    #[default]
    F32,
    /// Rounded to f16 (convolution, BatchNorm and linear inputs), about half the memory; all
    /// arithmetic stays f32.
    F16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The paper's: width 16, patch 112 x 112 x 80, 15,000 iterations.
    Paper,
    /// A small network and patch that train in minutes on a software device.
    Small,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub data: Option<PathBuf>,
    pub method: Method,
    /// The first `labeled` cases of the train list are labeled, the rest unlabeled.
    pub labeled: usize,
    pub iters: u64,
    pub patch: [usize; 3],
    /// Base width F of the network (16 in the paper).
    pub width: usize,
    pub batch: usize,
    pub labeled_bs: usize,
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    /// Storage of the saved activations.
    pub precision: Precision,
    pub momentum: f32,
    pub weight_decay: f32,
    pub seed: u64,
    /// Ramp length R in steps of `ramp_every` iterations; by default 40, 20 or 15 for 4, 8 or
    /// 16 labels.
    pub rampup: Option<f64>,
    pub ramp_every: u64,
    pub consistency: f64,
    pub omni: f64,
    pub memory_num: usize,
    pub num_filtered: usize,
    /// Sharpening temperature T of the consistency targets.
    pub temperature: f32,
    /// Temperature of the omni-correlation softmax.
    pub corr_temperature: f32,
    /// Width E of the projection and prediction heads.
    pub embed: usize,
    /// Probability of the Dropout3d after each encoder's block_five and each decoder's
    /// block_nine (0.5 in the reference).
    pub dropout: f32,
    /// Detach the sharpened consistency targets (the reference does not).
    pub detach_targets: bool,
    /// Random contrast, brightness, gamma and noise on each training patch (the reference
    /// augments by rotation, flip and crop only).
    pub intensity_aug: bool,
    /// Z-normalise each image over its whole volume when it is read, as the LA preprocessing
    /// does (for images not prepared by `prepare-la` or `synth`); the model file records it, so
    /// that `predict` and `eval` do the same.
    pub normalize: bool,
    /// Flatten the auxiliary embeddings channels-last for the memory bank (the reference does not).
    pub fix_memory_view: bool,
    /// Validation Dice on the test split every this many iterations (0: never).
    pub val_every: u64,
    /// A checkpoint every this many iterations (the final one is always written).
    pub checkpoint_every: u64,
    pub preset: Preset,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::preset(Preset::Paper)
    }
}

impl TrainConfig {
    pub fn preset(p: Preset) -> TrainConfig {
        let paper = TrainConfig {
            data: None,
            method: Method::Caml,
            labeled: 8,
            iters: 15_000,
            patch: [112, 112, 80],
            width: 16,
            batch: 4,
            labeled_bs: 2,
            lr: 0.01,
            lr_schedule: LrSchedule::Constant,
            precision: Precision::F32,
            momentum: 0.9,
            weight_decay: 1e-4,
            seed: 1337,
            rampup: None,
            ramp_every: 150,
            consistency: 1.0,
            omni: 0.05,
            memory_num: 256,
            num_filtered: 12_800,
            temperature: 0.1,
            corr_temperature: 0.1,
            embed: 32,
            dropout: 0.5,
            detach_targets: false,
            intensity_aug: false,
            normalize: false,
            fix_memory_view: false,
            val_every: 200,
            checkpoint_every: 1000,
            preset: Preset::Paper,
        };
        match p {
            Preset::Paper => paper,
            Preset::Small => TrainConfig {
                labeled: 4,
                iters: 500,
                patch: [48, 48, 32],
                width: 4,
                // 500 iterations instead of 15,000: a larger step than the paper's 0.01, decaying
                // to zero so that the final model is not the one a single noisy step left.
                lr: 0.03,
                lr_schedule: LrSchedule::Poly,
                // The reference's undetached targets hold the consistency term at its fixed point
                // p = 0.5, where some short runs settle with every foreground probability just
                // under 0.5 (no foreground predicted); detached, the term only sharpens.
                detach_targets: true,
                // Dropout3d zeroes half of x5's 16F channels: at F = 4 the decoder's BatchNorm
                // running statistics, gathered with dropout, then misfit the features without it
                // at inference (single PyTorch runs, 300 iterations, seeds 1 and 2: test Dice
                // 0.67 and 0.64 with dropout, 0.71 and 0.71 without).
                dropout: 0.0,
                // Contrast, bias and noise vary per phantom more than 4 labeled cases show, and
                // the BatchNorm statistics learned on them misfit other cases (PyTorch, 300
                // iterations, seeds 1 and 2: test Dice 0.71 and 0.71 without, 0.79 and 0.79 with;
                // with it 400 and 500 iterations reach 0.82 and 0.82, 0.86 and 0.84).
                intensity_aug: true,
                ramp_every: 5,
                memory_num: 64,
                num_filtered: 1600,
                val_every: 100,
                checkpoint_every: 100,
                preset: Preset::Small,
                ..paper
            },
        }
    }

    /// The learning rate of iteration `iter` (1-based, as logged).
    pub fn lr_at(&self, iter: u64) -> f32 {
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Poly => {
                let done = (iter.saturating_sub(1) as f64 / self.iters.max(1) as f64).min(1.0);
                (self.lr as f64 * (1.0 - done).powf(0.9)) as f32
            }
        }
    }

    /// Ramp length R.
    pub fn ramp_length(&self) -> f64 {
        self.rampup.unwrap_or(crate::caml::losses::Ramp::paper(self.labeled).length)
    }

    /// Reads a TOML file over this configuration: keys it names replace the current values.
    pub fn merge_file(self, path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut base = toml::Table::try_from(&self).expect("a config serializes to a table");
        let over: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        for (k, v) in over {
            base.insert(k, v);
        }
        let merged: TrainConfig = toml::Value::Table(base)
            .try_into()
            .with_context(|| format!("{}: invalid training configuration", path.display()))?;
        merged.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(merged)
    }

    /// The settings of a run's saved configuration (`saved`, the TOML text its checkpoint holds)
    /// that `self` changes, as `key = saved (this run: value)`, leaving out those a resumed run
    /// may change: where the data are, how many iterations, how often it validates and
    /// checkpoints, the preset's name. A setting the text lacks counts as unset where it may be
    /// unset (an option such as `rampup`); any other it lacks was added after the run was saved,
    /// and is not compared.
    pub fn resume_differences(&self, saved: &str) -> Result<Vec<String>> {
        const MAY_CHANGE: [&str; 5] = ["data", "iters", "val_every", "checkpoint_every", "preset"];
        let table = |c: &TrainConfig| toml::Table::try_from(c).expect("a config serializes to a table");
        // Which keys the text names; their values as this build reads them (f32 settings
        // through f32, as `self`'s are).
        let named: toml::Table = toml::from_str(saved).context("unreadable saved configuration")?;
        let old = table(&toml::from_str::<TrainConfig>(saved).context("invalid saved configuration")?);
        let (now, always) = (table(self), table(&TrainConfig::default()));
        // Floats as the f32 most of them are (0.03, not 0.029999999329447746); compared exactly.
        let show = |v: Option<&toml::Value>| match v {
            None => "unset".to_string(),
            Some(toml::Value::Float(x)) => format!("{:?}", *x as f32),
            Some(v) => v.to_string(),
        };
        let mut keys: Vec<&String> = old.keys().chain(now.keys()).collect();
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .filter(|k| !MAY_CHANGE.contains(&k.as_str()))
            .filter(|k| named.contains_key(*k) || !always.contains_key(*k))
            .filter(|k| old.get(*k) != now.get(*k))
            .map(|k| format!("{k} = {} (this run: {})", show(old.get(k)), show(now.get(k))))
            .collect())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config serializes to TOML")
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.patch.iter().find(|&&s| s == 0 || s % 16 != 0) {
            bail!("every patch side must be a positive multiple of 16 (four 2x downsamplings); got {s}");
        }
        if self.width == 0 || self.embed == 0 {
            bail!("width and embed must be positive");
        }
        if self.labeled_bs == 0 || self.labeled_bs > self.batch {
            bail!("labeled_bs ({}) must be between 1 and batch ({})", self.labeled_bs, self.batch);
        }
        if self.method != Method::LabeledOnly && self.labeled_bs == self.batch {
            bail!("method {:?} needs unlabeled samples in the batch: labeled_bs < batch", self.method);
        }
        if self.labeled < self.labeled_bs {
            bail!("{} labeled cases cannot fill {} labeled slots per batch", self.labeled, self.labeled_bs);
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("lr must be a positive number, got {}", self.lr);
        }
        // Written so that NaN fails every test.
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let non_negative = |v: f64| v >= 0.0 && v.is_finite();
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be at least 0 and below 1, got {}", self.dropout);
        }
        if !positive(self.temperature as f64) || !positive(self.corr_temperature as f64) {
            bail!(
                "temperatures must be positive numbers, got {} and {}",
                self.temperature,
                self.corr_temperature
            );
        }
        if !(non_negative(self.momentum as f64) && self.momentum < 1.0) {
            bail!("momentum must be in [0, 1), got {}", self.momentum);
        }
        if !non_negative(self.weight_decay as f64) {
            bail!("weight_decay must be a non-negative number, got {}", self.weight_decay);
        }
        if !non_negative(self.consistency) || !non_negative(self.omni) {
            bail!(
                "the loss weights must be non-negative numbers, got {} and {}",
                self.consistency,
                self.omni
            );
        }
        if let Some(r) = self.rampup.filter(|&r| !non_negative(r)) {
            bail!("rampup must be a non-negative number, got {r}");
        }
        if self.ramp_every == 0 {
            bail!("ramp_every must be positive");
        }
        Ok(())
    }
}

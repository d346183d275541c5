use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::caml::step::{TrainState, rehearse, train_step};
use crate::config::{Precision, Preset, TrainConfig};
use crate::data::sampler::{Batch, BatchIndices};
use crate::gpu::{Gpu, gpu};
use crate::rng::Rng;

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Median time and GFLOP/s of every convolution kernel (forward, backward data, backward
    /// weight) at the preset's shapes.
    Kernels {
        #[arg(long, value_enum, default_value_t = Preset::Small)]
        preset: Preset,
        /// Timed repetitions per kernel.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Seconds per training iteration and the runtime's work per iteration.
    TrainStep {
        #[arg(long, value_enum, default_value_t = Preset::Small)]
        preset: Preset,
        /// Timed iterations after two warm-up iterations.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Then one more iteration with every launch timed on the device (timestamp queries):
        /// device milliseconds per kernel, the largest first.
        #[arg(long)]
        profile: bool,
        /// Patch X Y Z instead of the preset's (each a multiple of 16): what a patch costs
        /// in time and memory on this adapter.
        #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
        patch: Option<Vec<usize>>,
        /// Samples per batch instead of the preset's (half of them labeled).
        #[arg(long)]
        batch: Option<usize>,
        /// Base width F of the network instead of the preset's.
        #[arg(long)]
        width: Option<usize>,
        /// Storage of the activations kept for the backward pass.
        #[arg(long, value_enum, default_value_t = Precision::F32)]
        precision: Precision,
        /// A run folder of `train`: the step with that run's configuration, from its last
        /// checkpoint (weights, momentum, memory bank) on its next batch from its data, instead
        /// of a new model on a random batch: what an iteration costs that far into training.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["preset", "patch", "batch", "width", "precision"])]
        run: Option<PathBuf>,
        /// Only rehearse the step at its largest selections, running nothing on the device: the
        /// memory a configuration's largest iteration takes, measured in seconds even where its
        /// iterations would take minutes (with CAML_CONV_NO_TUNE set, the convolutions are not
        /// timed either).
        #[arg(long, conflicts_with_all = ["iters", "profile"])]
        dry_run: bool,
    },
    /// Seconds to segment one LA-sized volume (130 x 130 x 88) with the preset's windows.
    Predict {
        #[arg(long, value_enum, default_value_t = Preset::Small)]
        preset: Preset,
    },
    /// What the buffer pool reserves for the requests of a trace that a command run with
    /// CAML_POOL_TRACE=FILE wrote, replayed on the host (no device needed): the pool's plans
    /// measured on steps recorded elsewhere.
    PoolReplay { trace: PathBuf },
}

/// Measure the engine on this adapter.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn synthetic_batch(cfg: &TrainConfig, rng: &mut Rng) -> Batch {
    let n: usize = cfg.patch.iter().product();
    let images = rng.vec(cfg.batch * n, -1.0, 1.0);
    // A centred cube of foreground, so every class and memory path is exercised.
    let [x, y, z] = cfg.patch;
    let labels = (0..cfg.batch)
        .flat_map(|_| {
            (0..n).map(move |i| {
                ((i / (y * z)) * 4 / x == 1 || (i / z % y) * 4 / y == 2 || i % z * 4 / z == 1) as u8
            })
        })
        .collect();
    let labeled = (0..cfg.labeled_bs).collect();
    let unlabeled = (cfg.labeled..cfg.labeled + cfg.batch - cfg.labeled_bs).collect();
    Batch { indices: BatchIndices { labeled, unlabeled }, patch: cfg.patch, images, labels }
}

/// The next batch of the run saved in `dir`, whose training state is restored into `st`, with
/// the learning rate of its next iteration.
fn run_batch(dir: &Path, st: &mut TrainState, cfg: &TrainConfig) -> Result<Batch> {
    let data = crate::train::dataset_dir(cfg.data.as_deref())?;
    let ds = crate::data::dataset::Dataset::open(&data)?;
    let (cases, _) = ds.load_model_inputs(&ds.train, cfg.normalize)?;
    let mut sampler = crate::train::restore_checkpoint(dir, st, cfg, cases.len())?;
    st.opt.config.lr = cfg.lr_at(st.iter + 1);
    println!("from {} at iteration {}, its next batch", dir.display(), st.iter);
    sampler.next_batch(&cases, cfg.patch, cfg.intensity_aug)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Replays a pool trace and prints what the pool reserved, per step and in all.
fn pool_replay(trace: &std::path::Path) -> Result<()> {
    let r = crate::gpu::replay_pool_trace(trace)?;
    println!("{:>5} {:>14} {:>14} {:>12}", "step", "peak MiB used", "peak reserved", "buffers made");
    for (i, s) in r.steps.iter().enumerate() {
        let (used, reserved) = (mib(s.peak_in_use), mib(s.peak_reserved));
        println!("{:>5} {used:>14.1} {reserved:>14.1} {:>12}", i + 1, s.allocations);
    }
    println!(
        "whole trace: peak {:.1} MiB in tensors, {:.1} MiB reserved, {} buffers made, {} plans",
        mib(r.total.peak_in_use),
        mib(r.total.peak_reserved),
        r.total.allocations,
        r.plans_made
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let g = match &a.what {
        What::PoolReplay { trace } => return pool_replay(trace),
        _ => Gpu::init()?,
    };
    println!("adapter: {} ({:?}, {:?})", g.info.name, g.info.backend, g.info.device_type);
    match a.what {
        What::Kernels { preset, reps } => {
            anyhow::ensure!(reps >= 1, "--reps must be at least 1");
            use crate::ops::conv::{BenchPreset, bench_conv_kernels};
            let p = match preset {
                Preset::Small => BenchPreset::Small,
                Preset::Paper => BenchPreset::Paper,
            };
            println!(
                "{:<26} {:<40} {:<22} {:>11} {:>9}",
                "kernel", "shape", "algorithm", "median ms", "GFLOP/s"
            );
            for r in bench_conv_kernels(p, reps) {
                println!(
                    "{:<26} {:<40} {:<22} {:>11.2} {:>9.2}",
                    r.kernel,
                    r.shape,
                    r.algo,
                    r.median_s * 1e3,
                    r.gflops
                );
            }
        }
        What::TrainStep { preset, iters, profile, patch, batch, width, precision, run, dry_run } => {
            let mut cfg = match &run {
                Some(dir) => TrainConfig::preset(preset).merge_file(&dir.join("config.toml"))?,
                None => TrainConfig { precision, ..TrainConfig::preset(preset) },
            };
            if let Some(p) = patch {
                cfg.patch = [p[0], p[1], p[2]];
            }
            if let Some(b) = batch {
                cfg.batch = b;
                cfg.labeled_bs = b.div_ceil(2).min(b.saturating_sub(1)).max(1);
            }
            if let Some(w) = width {
                cfg.width = w;
            }
            cfg.validate()?;
            crate::train::preflight(&cfg, cfg.batch, (g.limits.max_buffer_size, g.max_binding()), "--batch")?;
            let model = crate::train::build_model(&cfg);
            let mut st = TrainState::new(model, &cfg, 1);
            let batch = match &run {
                Some(dir) => run_batch(dir, &mut st, &cfg)?,
                None => synthetic_batch(&cfg, &mut Rng::new(7)),
            };
            // CAML's step is rehearsed first with its selections at their largest, as `train` does
            // (its memory then counts in the warm-up's); then warmed up until an iteration
            // allocates nothing.
            if cfg.method == crate::config::Method::Caml {
                let t = std::time::Instant::now();
                let made = rehearse(&mut st, &cfg, &batch)?;
                if dry_run {
                    let m = g.memory();
                    println!(
                        "rehearsed train step, {:?} preset (width {}, patch {:?}, batch {}, {:?} activations), \
                         nothing run: {made} buffers, peak {:.1} MiB in tensors, {:.1} MiB reserved by the \
                         pool ({:.1} s)",
                        cfg.preset,
                        cfg.width,
                        cfg.patch,
                        cfg.batch,
                        cfg.precision,
                        mib(m.peak_in_use),
                        mib(m.peak_reserved),
                        t.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
            }
            anyhow::ensure!(
                !dry_run,
                "--dry-run rehearses CAML's step; this configuration trains {:?}",
                cfg.method
            );
            for i in 0..10 {
                let a = gpu().allocations();
                train_step(&mut st, &cfg, &batch)?;
                if i >= 1 && gpu().allocations() == a {
                    break;
                }
            }
            let warm_up = g.memory();
            g.reset_peak_memory();
            crate::gpu::memtrace::reset_peak();
            let (c0, a0, p0) = (gpu().counters(), gpu().allocations(), gpu().buffer_plans());
            let mut times = Vec::new();
            for _ in 0..iters.max(1) {
                let t = std::time::Instant::now();
                train_step(&mut st, &cfg, &batch)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let (c1, a1, p1) = (gpu().counters(), gpu().allocations(), gpu().buffer_plans());
            let k = iters.max(1) as u64;
            let m = gpu().memory();
            println!(
                "train step, {:?} preset (width {}, patch {:?}, batch {}, {:?} activations):",
                cfg.preset, cfg.width, cfg.patch, cfg.batch, cfg.precision
            );
            println!(
                "  median {:.3} s per iteration (min {:.3}, max {:.3}, {} timed)",
                median(times.clone()),
                times.iter().cloned().fold(f64::MAX, f64::min),
                times.iter().cloned().fold(0.0, f64::max),
                times.len()
            );
            println!(
                "  per iteration: {} dispatches, {} submissions, {} readbacks, {} bytes read, {} uploads, {} buffer allocations, {} new buffer plans",
                (c1.dispatches - c0.dispatches) / k,
                (c1.submissions - c0.submissions) / k,
                (c1.readbacks - c0.readbacks) / k,
                (c1.bytes_read - c0.bytes_read) / k,
                (c1.uploads - c0.uploads) / k,
                (a1 - a0) as f64 / k as f64,
                (p1 - p0) as f64 / k as f64
            );
            let (record, wait) = (
                (c1.record_nanos - c0.record_nanos) as f64 * 1e-6 / k as f64,
                (c1.wait_nanos - c0.wait_nanos) as f64 * 1e-6 / k as f64,
            );
            let mean = times.iter().sum::<f64>() * 1e3 / k as f64;
            println!(
                "  host per iteration (mean): {record:.1} ms recording launches, {wait:.1} ms waiting for the \
                 device, {:.1} ms other work",
                mean - record - wait
            );
            println!(
                "  peak GPU memory: {:.1} MiB in tensors, {:.1} MiB reserved by the pool (warm-up included: {:.1} and {:.1} MiB)",
                mib(m.peak_in_use),
                mib(m.peak_reserved),
                mib(warm_up.peak_in_use.max(m.peak_in_use)),
                mib(warm_up.peak_reserved.max(m.peak_reserved))
            );
            if crate::gpu::memtrace::enabled() {
                println!("  tensors of 1 MiB or more alive at the peak, by the code that made them:");
                for (bytes, n, shape, site) in crate::gpu::memtrace::report(25) {
                    println!("  {:>9.1} MiB {n:>4} x e.g. {shape:?}  {site}", mib(bytes));
                }
                println!("  free buffers the pool holds between iterations, of 1 MiB or more:");
                for (bytes, n) in g.free_buffers().into_iter().filter(|b| b.0 >= 1 << 20) {
                    println!("  {:>9.1} MiB x {n}", mib(bytes));
                }
            }
            if profile {
                g.start_profiling()?;
                let t = std::time::Instant::now();
                train_step(&mut st, &cfg, &batch)?;
                let wall = t.elapsed().as_secs_f64();
                let (kernels, span) = g.stop_profiling();
                let device: f64 = kernels.iter().map(|(_, t)| t.nanos).sum::<f64>() * 1e-9;
                println!(
                    "  profiled iteration: {wall:.3} s wall (every submission waited for), {device:.3} s in \
                     kernels, {span:.3} s from the first kernel's start to the last one's end"
                );
                println!("  {:<60} {:>9} {:>11} {:>7}", "kernel", "launches", "device ms", "share");
                let row = |name: &str, launches: u64, nanos: f64| {
                    println!(
                        "  {:<60} {:>9} {:>11.2} {:>6.1}%",
                        name,
                        launches,
                        nanos * 1e-6,
                        100.0 * nanos * 1e-9 / device.max(1e-12)
                    );
                };
                for (name, t) in kernels.iter().take(30) {
                    row(name, t.launches, t.nanos);
                }
                if kernels.len() > 30 {
                    let rest = &kernels[30..];
                    let launches = rest.iter().map(|(_, t)| t.launches).sum();
                    let nanos = rest.iter().map(|(_, t)| t.nanos).sum();
                    row(&format!("({} other kernels)", rest.len()), launches, nanos);
                }
            }
        }
        What::PoolReplay { .. } => unreachable!("replayed above, without a device"),
        What::Predict { preset } => {
            let cfg = TrainConfig::preset(preset);
            let model = crate::train::build_model(&cfg);
            let dims = [130, 130, 88];
            let n: usize = dims.iter().product();
            let image = crate::data::Volume::from_vec(dims, Rng::new(2).vec(n, -1.0, 1.0))?;
            let opts = crate::infer::predict::PredictOptions {
                window: crate::train::window_options(cfg.patch),
                normalize: false,
                average_decoders: false,
                mirror: [false; 3],
                largest_component: false,
            };
            let plan = crate::infer::window::WindowPlan::new(dims, opts.window.patch, opts.window.stride)?;
            let t = std::time::Instant::now();
            crate::infer::predict::predict(&model, &image, &opts)?;
            println!(
                "predict, {preset:?} preset: {:.2} s for a 130 x 130 x 88 volume ({} windows of {:?})",
                t.elapsed().as_secs_f64(),
                plan.windows().len(),
                opts.window.patch
            );
        }
    }
    Ok(())
}

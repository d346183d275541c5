//! The GPU runtime: one process-wide device, a buffer pool, a pipeline cache and command batching.
//!
//! Every kernel launch goes through [`Gpu::dispatch`]: binding 0 of a kernel is its uniform
//! parameter block, bindings 1.. are storage buffers in the order given. Launches record into one
//! shared command encoder that is submitted when a result is read back, an upload needs ordering,
//! or the batch is full.

mod denormals;
pub mod memtrace;
pub mod pipeline_cache;
mod pool;
mod profile;
mod shaders;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use pipeline_cache::PipelineCacheFile;
use pool::Pool;
pub use pool::{GpuBuffer, MemoryStats, Replay as PoolReplay, replay as replay_pool_trace};
pub use profile::KernelTime;
pub use shaders::generated as generated_shader;

/// Workgroup size of every one-dimensional kernel (`@workgroup_size(256)` in the shaders).
pub const WG: u32 = 256;

/// Size of one parameter slot; a kernel's uniform block must fit in it.
const PARAM_SLOT: u64 = 256;
/// Parameter slots per batch: a batch is submitted when they are used up (a training iteration
/// of the small preset records about 2,600 launches).
const PARAM_SLOTS: u64 = 4096;
/// Unit of the staging memory that carries uploads, in bytes.
const UPLOAD_CHUNK: u64 = 4 << 20;

/// A kernel: a WGSL file from `shaders/`, an entry point and its override constants.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub shader: &'static str,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
}

impl Kernel {
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        Kernel { shader, entry, constants: Vec::new() }
    }
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value));
        self
    }
    fn key(&self) -> PipelineKey {
        PipelineKey {
            shader: self.shader,
            entry: self.entry,
            constants: self.constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
}

/// A storage binding: a whole buffer or a byte range of it.
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    pub buffer: &'a GpuBuffer,
    pub offset: u64,
    /// Bytes; `None` binds to the end of the bytes the buffer was asked for.
    pub size: Option<u64>,
}

impl<'a> From<&'a GpuBuffer> for Binding<'a> {
    fn from(buffer: &'a GpuBuffer) -> Self {
        Binding { buffer, offset: 0, size: None }
    }
}

/// Counters of the work the runtime did, for benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub dispatches: u64,
    pub submissions: u64,
    pub readbacks: u64,
    pub bytes_read: u64,
    pub uploads: u64,
    pub pipelines_compiled: u64,
    /// Host time spent recording launches (validation, bind groups, encoding), nanoseconds.
    pub record_nanos: u64,
    /// Host time spent waiting for the device, nanoseconds.
    pub wait_nanos: u64,
}

struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    /// The compute pass consecutive launches share (wgpu orders and synchronizes the launches
    /// inside a pass); closed before anything else is recorded on the encoder.
    pass: Option<wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    slots: u64,
    params_buffer: wgpu::Buffer,
    /// Per-kernel device times, when profiling is on.
    profiler: Option<profile::Profiler>,
    /// Staging memory for uploads, copied in recording order.
    belt: wgpu::util::StagingBelt,
}

impl Recorder {
    /// The open encoder (a new one if none), after closing the shared compute pass.
    fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pool: Mutex<Pool>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Compiled pipelines persisted across processes (adapters with `PIPELINE_CACHE`).
    pipeline_cache: Option<PipelineCacheFile>,
    rec: Mutex<Recorder>,
    /// Held around every submission and every poll of the device, so that no two run at once:
    /// wgpu-core 30.0 panics ("If the queue is empty, the current submission index ... should be
    /// at least the wait submission index") when one thread's waiting poll finds the queue
    /// emptied by another thread's poll between two of its own reads (fixed upstream after
    /// 30.0.2). Tests record from several threads at once; a training run from one.
    serial: Mutex<()>,
    /// Mappable buffers for readbacks, by power-of-two size.
    staging: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    dispatches: AtomicU64,
    submissions: AtomicU64,
    readbacks: AtomicU64,
    bytes_read: AtomicU64,
    uploads: AtomicU64,
    compiled: AtomicU64,
    record_nanos: AtomicU64,
    wait_nanos: AtomicU64,
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

thread_local! {
    /// This thread is rehearsing: see [`Gpu::rehearse`].
    static REHEARSING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is in [`Gpu::rehearse`] (and not in a [`Gpu::for_real`] inside it).
pub fn rehearsing() -> bool {
    REHEARSING.with(|c| c.get())
}

/// Why the device was lost, once it has been.
static LOST: OnceLock<String> = OnceLock::new();

/// A wgpu error's text (which spans lines) on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The process-wide GPU; panics with the adapter error when there is none. Command-line entry
/// points call [`Gpu::init`] first so that the error reaches the user as a message.
pub fn gpu() -> &'static Gpu {
    match Gpu::init() {
        Ok(g) => g,
        Err(e) => panic!("{e:#}"),
    }
}

/// Features the engine uses when the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::PIPELINE_CACHE);

const NO_ADAPTER_HELP: &str = "no GPU adapter found. Install your GPU's Vulkan, Metal or DX12 \
driver, or on a machine without a GPU a software Vulkan device: `apt-get install \
mesa-vulkan-drivers` (Debian/Ubuntu). WGPU_BACKEND, WGPU_ADAPTER_NAME and WGPU_POWER_PREF choose \
among several adapters; `caml-wgpu info` shows the one in use.";

impl Gpu {
    /// Opens the adapter chosen by wgpu's environment variables, once per process.
    pub fn init() -> Result<&'static Gpu> {
        GPU.get_or_init(|| Gpu::open().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
    }

    /// The process-wide GPU if it was opened already; never opens one.
    pub fn opened() -> Option<&'static Gpu> {
        GPU.get().and_then(|g| g.as_ref().ok())
    }

    fn open() -> Result<Gpu> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if std::env::var_os("WGPU_BACKEND").is_none() {
            // The engine targets compute APIs; GL has no storage-buffer compute on every driver.
            desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
        }
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(choose_adapter(&instance, backends))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features() & WANTED_FEATURES;
        let desc = wgpu::DeviceDescriptor {
            label: Some("caml-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let request = || pollster::block_on(adapter.request_device(&desc));
        // A software device's worker threads, started here, flush denormals (see `denormals`).
        let opened = if info.device_type == wgpu::DeviceType::Cpu {
            denormals::with_denormals_flushed(request)
        } else {
            request()
        };
        let (device, queue) =
            opened.with_context(|| format!("could not open a device on adapter '{}'", info.name))?;
        device.set_device_lost_callback(|reason, msg| {
            let why = if msg.is_empty() { format!("{reason:?}") } else { format!("{reason:?}: {msg}") };
            let _ = LOST.set(one_line(&why));
        });
        let belt = wgpu::util::StagingBelt::new(device.clone(), UPLOAD_CHUNK);
        let pipeline_cache = features
            .contains(wgpu::Features::PIPELINE_CACHE)
            .then(pipeline_cache::cache_dir)
            .flatten()
            .and_then(|dir| pipeline_cache::cache_file(&dir, &info))
            .map(|path| PipelineCacheFile::open(&device, path));
        // Errors no error scope caught, as one-line panics rather than wgpu's multi-line report.
        // A destroyed or lost device reports its loss only from a poll, and meanwhile its objects
        // are merely "invalid": a poll here (no wgpu lock is held) tells which.
        let polled = device.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let text = one_line(&e.to_string());
            if LOST.get().is_none() {
                let _ = polled.poll(wgpu::PollType::Poll);
            }
            match (LOST.get(), &e) {
                (Some(why), _) => panic!("the GPU device was lost ({why}): {text}"),
                (None, wgpu::Error::OutOfMemory { .. }) => {
                    panic!("the GPU is out of memory ({text}); use a smaller --patch or --batch")
                }
                (None, _) => panic!("GPU error: {text}"),
            }
        }));
        let params_buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: PARAM_SLOT * PARAM_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let pool = Pool::new(limits.max_buffer_size)?;
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            pool: Mutex::new(pool),
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pipeline_cache,
            rec: Mutex::new(Recorder {
                encoder: None,
                pass: None,
                params: Vec::new(),
                slots: 0,
                params_buffer,
                profiler: None,
                belt,
            }),
            serial: Mutex::new(()),
            staging: Mutex::new(HashMap::new()),
            dispatches: AtomicU64::new(0),
            submissions: AtomicU64::new(0),
            readbacks: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            compiled: AtomicU64::new(0),
            record_nanos: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
        })
    }

    /// True for a software rasterizer/compute device (lavapipe, SwiftShader, WARP).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Invocations that keep the adapter busy: a reduction with fewer outputs than this splits
    /// its domain into chunks until it has about this many. A software device runs a few per
    /// core; a GPU hides its memory latency only with tens of thousands resident.
    pub fn fill_invocations(&self) -> usize {
        if self.is_software() { 4096 } else { 131_072 }
    }

    /// The largest byte range one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// A storage buffer of at least `bytes` bytes from the pool (contents undefined).
    pub fn alloc(&self, bytes: u64) -> Result<GpuBuffer> {
        let bytes = bytes.max(4);
        if bytes > self.limits.max_buffer_size {
            bail!(
                "a buffer of {bytes} bytes exceeds this adapter's maximum buffer size of {} bytes",
                self.limits.max_buffer_size
            );
        }
        self.pool.lock().unwrap().take(&self.device, bytes).map_err(|e| {
            let what = match e {
                wgpu::Error::OutOfMemory { .. } => "the device is out of memory".to_string(),
                e => one_line(&e.to_string()),
            };
            anyhow!("the device could not allocate a buffer of {bytes} bytes: {what}")
        })
    }

    /// Marks the start of a training step: its buffers follow a plan made from the previous
    /// step's, so that the pool holds little more than the step's peak in tensors.
    pub fn begin_step(&self) {
        self.pool.lock().unwrap().begin_step();
    }

    /// Marks the end of a training step.
    pub fn end_step(&self) {
        self.pool.lock().unwrap().end_step();
    }

    /// Buffer plans made so far: one per training step whose requests changed.
    pub fn buffer_plans(&self) -> u64 {
        self.pool.lock().unwrap().plans_made()
    }

    pub fn memory(&self) -> MemoryStats {
        self.pool.lock().unwrap().stats()
    }

    /// Releases the pool's free buffers back to the driver.
    pub fn trim_pool(&self) {
        self.pool.lock().unwrap().trim();
    }

    pub fn reset_peak_memory(&self) {
        self.pool.lock().unwrap().reset_peak();
    }

    pub fn counters(&self) -> Counters {
        Counters {
            dispatches: self.dispatches.load(Ordering::Relaxed),
            submissions: self.submissions.load(Ordering::Relaxed),
            readbacks: self.readbacks.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            pipelines_compiled: self.compiled.load(Ordering::Relaxed),
            record_nanos: self.record_nanos.load(Ordering::Relaxed),
            wait_nanos: self.wait_nanos.load(Ordering::Relaxed),
        }
    }

    /// The pool's free buffers, (bytes, count) by size, the largest first (memory reports).
    pub fn free_buffers(&self) -> Vec<(u64, usize)> {
        self.pool.lock().unwrap().free_buffers()
    }

    /// Allocations made by the pool so far (misses), for benchmarks.
    pub fn allocations(&self) -> u64 {
        self.pool.lock().unwrap().allocations()
    }

    fn pipeline(&self, kernel: &Kernel) -> Arc<wgpu::ComputePipeline> {
        let key = kernel.key();
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap();
            modules
                .entry(kernel.shader)
                .or_insert_with(|| {
                    let src = shaders::source(kernel.shader)
                        .unwrap_or_else(|| panic!("no shader named '{}'", kernel.shader));
                    self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(kernel.shader),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    })
                })
                .clone()
        };
        let pipeline = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &kernel.constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: self.pipeline_cache.as_ref().map(|c| &c.cache),
        }));
        self.compiled.fetch_add(1, Ordering::Relaxed);
        self.pipelines.lock().unwrap().entry(key).or_insert(pipeline).clone()
    }

    /// The persistent pipeline cache, when the adapter supports one and it is not disabled.
    pub fn pipeline_cache(&self) -> Option<&PipelineCacheFile> {
        self.pipeline_cache.as_ref()
    }

    /// Saves the pipeline cache when pipelines were compiled since the last save; true when it
    /// wrote. Commands call it when they finish and after the first training iteration.
    pub fn save_pipeline_cache(&self) -> Result<bool> {
        match &self.pipeline_cache {
            Some(c) => c.save(self.compiled.load(Ordering::Relaxed)),
            None => Ok(false),
        }
    }

    /// Records one kernel launch. `params` is the kernel's uniform block (at most 256 bytes).
    pub fn dispatch(&self, kernel: &Kernel, params: &[u8], buffers: &[Binding], groups: [u32; 3]) {
        if groups.contains(&0) {
            return;
        }
        let start = Instant::now();
        let max = self.limits.max_compute_workgroups_per_dimension;
        assert!(
            groups.iter().all(|&g| g <= max),
            "kernel {}::{} launched with {groups:?} workgroups (limit {max} per dimension)",
            kernel.shader,
            kernel.entry
        );
        assert!(params.len() as u64 <= PARAM_SLOT, "parameter block over {PARAM_SLOT} bytes");
        for b in buffers {
            let size = b.size.unwrap_or(b.buffer.bytes() - b.offset);
            assert!(
                size <= self.max_binding(),
                "kernel {}::{} binds {size} bytes of one buffer, over this adapter's storage \
                 binding limit of {} bytes",
                kernel.shader,
                kernel.entry,
                self.max_binding()
            );
        }
        let pipeline = self.pipeline(kernel);
        if rehearsing() {
            return;
        }
        let mut rec = self.rec.lock().unwrap();
        if rec.slots == PARAM_SLOTS || rec.profiler.as_ref().is_some_and(|p| p.full()) {
            self.submit_locked(&mut rec);
        }
        let offset = rec.slots * PARAM_SLOT;
        rec.params.extend_from_slice(params);
        let end = ((rec.slots + 1) * PARAM_SLOT) as usize;
        rec.params.resize(end, 0);
        rec.slots += 1;
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        if !params.is_empty() {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &rec.params_buffer,
                    offset,
                    size: std::num::NonZeroU64::new(PARAM_SLOT),
                }),
            });
        }
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer.raw(),
                    offset: b.offset,
                    size: std::num::NonZeroU64::new(b.size.unwrap_or(b.buffer.bytes() - b.offset)),
                }),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let rec = &mut *rec;
        // Profiled launches get a pass of their own, timed from its start to its end.
        if rec.pass.is_none() || rec.profiler.is_some() {
            rec.encoder(&self.device);
            let encoder = rec.encoder.as_mut().expect("an encoder is open");
            let timestamp_writes = rec.profiler.as_mut().map(|p| p.next(kernel));
            let pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
            rec.pass = Some(pass.forget_lifetime());
        }
        let pass = rec.pass.as_mut().expect("a compute pass is open");
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        self.record_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// A one-dimensional launch over `n` invocations of a `WG`-wide kernel; kernels recover the
    /// linear index as `gid.x + gid.y * num_workgroups.x * WG`.
    pub fn dispatch_1d(&self, kernel: &Kernel, params: &[u8], buffers: &[Binding], n: u64) {
        self.dispatch(kernel, params, buffers, self.groups_1d(n, WG));
    }

    /// Workgroup counts covering `n` invocations of width `wg`, folded into y past the limit.
    pub fn groups_1d(&self, n: u64, wg: u32) -> [u32; 3] {
        let groups = n.div_ceil(wg as u64);
        let max = self.limits.max_compute_workgroups_per_dimension as u64;
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            [groups.div_ceil(y) as u32, y as u32, 1]
        }
    }

    /// Copies `bytes` bytes between buffers, in recording order.
    pub fn copy(&self, src: &GpuBuffer, src_offset: u64, dst: &GpuBuffer, dst_offset: u64, bytes: u64) {
        if bytes == 0 || rehearsing() {
            return;
        }
        let mut rec = self.rec.lock().unwrap();
        let encoder = rec.encoder(&self.device);
        encoder.copy_buffer_to_buffer(src.raw(), src_offset, dst.raw(), dst_offset, bytes);
    }

    /// Writes host data into a buffer, ordered after every launch recorded so far.
    pub fn upload(&self, dst: &GpuBuffer, offset: u64, data: &[u8]) {
        if data.is_empty() || rehearsing() {
            return;
        }
        let mut rec = self.rec.lock().unwrap();
        self.uploads.fetch_add(1, Ordering::Relaxed);
        let padded;
        let data = if data.len().is_multiple_of(4) {
            data
        } else {
            padded = [data, &[0u8; 3][..4 - data.len() % 4]].concat();
            &padded[..]
        };
        // Through staging memory and a copy recorded in order (queue.write_buffer would land
        // before every launch of the open batch, so a pooled buffer still read by recorded work
        // would be overwritten); no submission is needed.
        let rec = &mut *rec;
        rec.encoder(&self.device);
        let encoder = rec.encoder.as_mut().expect("an encoder is open");
        let size = wgpu::BufferSize::new(data.len() as u64).expect("a non-empty upload");
        rec.belt.write_buffer(encoder, dst.raw(), offset, size).copy_from_slice(data);
    }

    /// Takes the lock that submissions and polls hold (the `serial` field); a thread that
    /// panicked holding it (a lost device) leaves nothing inconsistent behind, so the others go on.
    fn serial(&self) -> std::sync::MutexGuard<'_, ()> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` as a rehearsal on this thread: its buffers are taken from the pool and given back
    /// as they would be, and its kernels compiled, but no launch, copy or upload is recorded, so
    /// that nothing on the device changes and no buffer is written. A training step rehearsed
    /// with its selections at their largest sizes makes the buffer pool's plan for every step
    /// after it. Code that needs a result read back checks [`rehearsing`]; tensors made in a
    /// rehearsal hold no values, so none may outlive it.
    pub fn rehearse<R>(&self, f: impl FnOnce() -> R) -> R {
        crate::autograd::with_flag(&REHEARSING, true, f)
    }

    /// Runs `f` for real inside a rehearsal (timing kernels, which reads results back); its
    /// inputs made in the rehearsal hold stale values.
    pub fn for_real<R>(&self, f: impl FnOnce() -> R) -> R {
        crate::autograd::with_flag(&REHEARSING, false, f)
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) {
        let mut rec = self.rec.lock().unwrap();
        self.submit_locked(&mut rec);
    }

    fn submit_locked(&self, rec: &mut Recorder) {
        if rec.slots > 0 {
            self.queue.write_buffer(&rec.params_buffer, 0, &rec.params);
            rec.params.clear();
            rec.slots = 0;
        }
        rec.pass = None;
        if let Some(mut encoder) = rec.encoder.take() {
            if let Some(p) = &rec.profiler {
                p.resolve(&mut encoder);
            }
            rec.belt.finish();
            let _serial = self.serial();
            self.queue.submit([encoder.finish()]);
            rec.belt.recall();
            self.submissions.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = &mut rec.profiler {
                p.collect(&self.device, self.queue.get_timestamp_period());
            }
        }
    }

    /// Starts timing every launch on the device (adapters with TIMESTAMP_QUERY). Each submission
    /// then waits for the device, so this is for benchmarks only.
    pub fn start_profiling(&self) -> Result<()> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            bail!("adapter '{}' has no timestamp queries; profiling needs them", self.info.name);
        }
        let mut rec = self.rec.lock().unwrap();
        self.submit_locked(&mut rec);
        rec.profiler = Some(profile::Profiler::new(&self.device));
        Ok(())
    }

    /// Stops profiling and returns the device time per kernel, the largest first, and the
    /// seconds from the first launch's start to the last one's end of each submission, summed.
    pub fn stop_profiling(&self) -> (Vec<(&'static str, KernelTime)>, f64) {
        let mut rec = self.rec.lock().unwrap();
        self.submit_locked(&mut rec);
        let Some(p) = rec.profiler.take() else { return (Vec::new(), 0.0) };
        let mut out: Vec<_> = p.totals.into_iter().collect();
        out.sort_by(|a, b| b.1.nanos.total_cmp(&a.1.nanos));
        (out, p.span_nanos * 1e-9)
    }

    /// Submits what is recorded and waits until the device has finished it.
    pub fn sync(&self) {
        self.flush();
        self.wait();
    }

    /// Waits for the submitted work, checking every second whether the device was lost, so that a
    /// lost device is an error rather than a hang.
    fn wait(&self) {
        let _timer = WaitTimer(&self.wait_nanos, Instant::now());
        loop {
            let wait = wgpu::PollType::Wait { submission_index: None, timeout: Some(Duration::from_secs(1)) };
            let polled = {
                let _serial = self.serial();
                self.device.poll(wait)
            };
            if let Some(why) = LOST.get() {
                panic!("the GPU device was lost ({why})");
            }
            match polled {
                Ok(_) => return,
                Err(wgpu::PollError::Timeout) => {}
                Err(e) => panic!("waiting for the GPU failed: {e}"),
            }
        }
    }

    /// Reads `bytes` bytes of a buffer back to the host, submitting what is recorded.
    pub fn read(&self, src: &GpuBuffer, offset: u64, bytes: u64) -> Vec<u8> {
        assert!(!rehearsing(), "a GPU buffer read back while rehearsing: rehearsed work has no values");
        if bytes == 0 {
            return Vec::new();
        }
        let aligned = bytes.next_multiple_of(4);
        let class = aligned.next_power_of_two().max(256);
        let staging = self.staging.lock().unwrap().get_mut(&class).and_then(|v| v.pop());
        let staging = staging.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: class,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        {
            let mut rec = self.rec.lock().unwrap();
            let encoder = rec.encoder(&self.device);
            encoder.copy_buffer_to_buffer(src.raw(), offset, &staging, 0, aligned);
            self.submit_locked(&mut rec);
        }
        let slice = staging.slice(..aligned);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        // Another thread's poll may have taken the completion and be about to run the callback:
        // wait for it, checking that the device is still there.
        let mapped = loop {
            self.wait();
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => panic!("reading a GPU buffer back failed: {e}"),
            }
        };
        if let Err(e) = mapped {
            let lost = LOST.get().map(|why| format!(" (the device was lost: {why})")).unwrap_or_default();
            panic!("reading a GPU buffer back failed: {e}{lost}");
        }
        let out = slice.get_mapped_range().unwrap_or_else(|e| panic!("mapping a GPU buffer failed: {e:?}"))
            [..bytes as usize]
            .to_vec();
        staging.unmap();
        self.staging.lock().unwrap().entry(class).or_default().push(staging);
        self.readbacks.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        out
    }
}

/// Adds the time since its start to a counter when dropped.
struct WaitTimer<'a>(&'a AtomicU64, Instant);

impl Drop for WaitTimer<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(self.1.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

async fn choose_adapter(instance: &wgpu::Instance, backends: wgpu::Backends) -> Result<wgpu::Adapter> {
    let adapters = instance.enumerate_adapters(backends).await;
    if adapters.is_empty() {
        bail!("{NO_ADAPTER_HELP}");
    }
    if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
        let want = name.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want)).ok_or_else(
            || anyhow!("WGPU_ADAPTER_NAME={name} matches none of the adapters: {}", names.join(", ")),
        );
    }
    let power = wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::HighPerformance);
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: power,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })
        .await
        .map_err(|e| anyhow!("{NO_ADAPTER_HELP} ({e})"))
}

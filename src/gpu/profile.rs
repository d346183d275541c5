//! Per-kernel device time from timestamp queries: every launch of a profiled batch writes a
//! timestamp before and after its compute pass, and each submission reads them back. Profiling
//! waits for every submission, so it is for `bench --profile`, never for a training run.

use std::collections::HashMap;

/// Launches one query set covers (two timestamps each).
const CAPACITY: u32 = 2048;

/// Accumulated device time of one kernel entry point.
#[derive(Clone, Debug, Default)]
pub struct KernelTime {
    pub launches: u64,
    pub nanos: f64,
}

pub(super) struct Profiler {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// The kernel of each launch recorded in the open batch.
    pending: Vec<&'static str>,
    pub(super) totals: HashMap<&'static str, KernelTime>,
    /// From each batch's first launch's start to its last launch's end, summed: the device's
    /// busy time plus the gaps between launches.
    pub(super) span_nanos: f64,
    /// One name per pipeline: shader::entry and its override constants.
    names: HashMap<String, &'static str>,
}

impl Profiler {
    pub(super) fn new(device: &wgpu::Device) -> Profiler {
        let bytes = CAPACITY as u64 * 2 * 8;
        Profiler {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: CAPACITY * 2,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile-resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile-readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            pending: Vec::new(),
            totals: HashMap::new(),
            span_nanos: 0.0,
            names: HashMap::new(),
        }
    }

    /// True when the open batch has no room for another launch.
    pub(super) fn full(&self) -> bool {
        self.pending.len() as u32 == CAPACITY
    }

    /// The timestamp writes of the next launch, a kernel named `label`.
    pub(super) fn next(&mut self, kernel: &super::Kernel) -> wgpu::ComputePassTimestampWrites<'_> {
        let mut name = format!("{}::{}", kernel.shader, kernel.entry);
        for (c, v) in &kernel.constants {
            name += &format!(" {c}={v}");
        }
        // Leaked once per pipeline variant, of which a process has a few hundred at most.
        let label = *self.names.entry(name).or_insert_with_key(|n| Box::leak(n.clone().into_boxed_str()));
        let i = self.pending.len() as u32;
        self.pending.push(label);
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        }
    }

    /// Records the copy of this batch's timestamps; call before the encoder is finished.
    pub(super) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let n = self.pending.len() as u32 * 2;
        if n > 0 {
            encoder.resolve_query_set(&self.queries, 0..n, &self.resolve, 0);
            encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, n as u64 * 8);
        }
    }

    /// After the batch was submitted: waits for it and adds its launches to the totals.
    pub(super) fn collect(&mut self, device: &wgpu::Device, period_ns: f32) {
        if self.pending.is_empty() {
            return;
        }
        let bytes = self.pending.len() as u64 * 16;
        let slice = self.readback.slice(..bytes);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        if let Err(e) = device.poll(wgpu::PollType::wait_indefinitely()) {
            panic!("waiting for the GPU failed: {e}");
        }
        {
            let data = slice.get_mapped_range().expect("profile timestamps are mapped");
            let ticks: &[u64] = bytemuck::cast_slice(&data);
            for (i, label) in self.pending.iter().enumerate() {
                let t = self.totals.entry(label).or_default();
                t.launches += 1;
                t.nanos += ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period_ns as f64;
            }
            let n = self.pending.len();
            self.span_nanos += ticks[2 * n - 1].saturating_sub(ticks[0]) as f64 * period_ns as f64;
        }
        self.readback.unmap();
        self.pending.clear();
    }
}

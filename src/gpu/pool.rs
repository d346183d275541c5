//! Buffer pool: released storage buffers are kept by size class and handed out again.

use std::collections::BTreeMap;

/// Bytes held by buffers: `in_use` by live tensors, `reserved` including the pool's free list.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStats {
    pub in_use: u64,
    pub peak_in_use: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
    pub allocations: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    free: BTreeMap<u64, Vec<wgpu::Buffer>>,
    stats: MemoryStats,
}

/// The size class of a request: the next size of the form m * 2^k with m in 4..=7, so that a
/// class wastes at most a quarter of its bytes.
fn size_class(bytes: u64) -> u64 {
    if bytes <= 256 {
        return 256;
    }
    let k = 63 - bytes.leading_zeros() as u64 - 2;
    bytes.div_ceil(1 << k) << k
}

impl Pool {
    /// A buffer of at least `bytes` (at most `max`, the device's largest); when the device cannot
    /// create one (out of memory) the pool's free buffers are released and the creation tried once
    /// more.
    pub(crate) fn take(
        &mut self,
        device: &wgpu::Device,
        bytes: u64,
        max: u64,
    ) -> Result<GpuBuffer, wgpu::Error> {
        // A class rounded up past the device's maximum would be refused: the exact size is not.
        let class = size_class(bytes).min(max.max(bytes));
        let buffer = match self.reuse(class) {
            Some(b) => b,
            None => {
                let b = match create(device, class) {
                    Ok(b) => b,
                    Err(_) => {
                        self.trim();
                        create(device, class)?
                    }
                };
                self.stats.allocations += 1;
                self.stats.reserved += class;
                self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
                b
            }
        };
        self.stats.in_use += buffer.size();
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(GpuBuffer { buffer: Some(buffer), len: bytes })
    }

    /// The smallest free buffer of `class` or of the next three classes up (at most 1.75x the
    /// bytes): tensors whose sizes vary from step to step (selected rows) then reuse what the
    /// last steps released instead of allocating, and the backward pass's temporaries take the
    /// buffers the forward pass's activations released even when their sizes differ a little.
    /// (Two classes up reserved 20% more at the paper's width with f16 storage; four or more
    /// hold more in tensors.) The tensor binds only the bytes it asked for.
    fn reuse(&mut self, class: u64) -> Option<wgpu::Buffer> {
        let top = (0..3).fold(class, |c, _| size_class(c + 1));
        self.free.range_mut(class..=top).find_map(|(_, v)| v.pop())
    }

    fn give_back(&mut self, buffer: wgpu::Buffer) {
        self.stats.in_use -= buffer.size();
        self.free.entry(buffer.size()).or_default().push(buffer);
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// The free buffers, (bytes, count) by size, the largest sizes first.
    pub(crate) fn free_buffers(&self) -> Vec<(u64, usize)> {
        self.free.iter().rev().filter(|(_, v)| !v.is_empty()).map(|(&b, v)| (b, v.len())).collect()
    }

    pub(crate) fn allocations(&self) -> u64 {
        self.stats.allocations
    }

    pub(crate) fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
        self.stats.peak_reserved = self.stats.reserved;
    }

    /// Frees every pooled buffer that no tensor holds.
    pub(crate) fn trim(&mut self) {
        for (class, list) in std::mem::take(&mut self.free) {
            self.stats.reserved -= class * list.len() as u64;
        }
    }
}

/// A storage buffer, with the error the device reports instead of its uncaptured-error handler.
fn create(device: &wgpu::Device, size: u64) -> Result<wgpu::Buffer, wgpu::Error> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let invalid = pollster::block_on(invalid.pop());
    match invalid.or(pollster::block_on(oom.pop())) {
        Some(e) => Err(e),
        None => Ok(buffer),
    }
}

/// A pooled storage buffer; dropping it returns it to the pool.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    /// The bytes asked for: what a whole-buffer binding covers.
    len: u64,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
    /// Capacity in bytes (a size class, at least what was asked for).
    pub fn size(&self) -> u64 {
        self.raw().size()
    }
    /// The bytes asked for (at most the capacity): a binding without a size ends here.
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        super::memtrace::release(self as *const GpuBuffer as usize);
        if let (Some(b), Some(Ok(gpu))) = (self.buffer.take(), super::GPU.get()) {
            gpu.pool.lock().unwrap().give_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_waste_at_most_a_quarter() {
        for bytes in [1u64, 255, 256, 257, 1000, 4096, 5000, 1 << 20, (1 << 20) + 1, 245 << 20] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c <= 256 || (c - bytes) * 4 <= c, "{bytes} -> {c}");
        }
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class(5 << 20), 5 << 20);
    }
}

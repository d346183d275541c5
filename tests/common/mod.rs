//! Helpers shared by the test binaries of the buffer pool.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;

pub const MIB: usize = 1 << 20;

/// A step whose 4 MiB tensors die before its 8 MiB ones are made: a size-class pool cannot give
/// the 8 MiB requests the 4 MiB buffers, a plan puts the 4 MiB tensors into the 8 MiB buffers.
/// `extra` adds requests in the middle (a loss term that starts to contribute); `rows` sizes one
/// tensor the way a masked selection does.
pub fn step(k: f32, rows: usize, extra: bool) -> f32 {
    gpu().begin_step();
    let small = Tensor::zeros(&[MIB]).add_scalar(k);
    let s = small.sum_all();
    drop(small);
    let s = if extra { s.add(&Tensor::zeros(&[MIB / 2]).add_scalar(1.0).sum_all()) } else { s };
    let selected = Tensor::zeros(&[rows]).add_scalar(2.0);
    let big = Tensor::zeros(&[2 * MIB]).add_scalar(1.0);
    let t = big.sum_all().add(&s).add(&selected.sum_all());
    drop((big, selected));
    gpu().end_step();
    t.item()
}

pub fn expected(k: f32, rows: usize, extra: bool) -> f32 {
    (2 * MIB) as f32 + k * MIB as f32 + 2.0 * rows as f32 + if extra { (MIB / 2) as f32 } else { 0.0 }
}

//! Convolution kernels, one group per layer of the small preset (the three k3 shapes of the
//! kernel targets, transposed convolutions with the same channels and output sizes, and the
//! small training preset's layers): forward, input gradient and weight gradient.
//!
//! Throughput is given as elements = floating-point operations (two per multiply-add of the
//! pass), so criterion's "elem/s" reads as FLOP/s (Gelem/s = GFLOP/s). Each iteration launches
//! the pass (weight preparation, kernels, partial-sum reduction) and waits for it with a 4-byte
//! readback; the kernel choice is autotuned once before timing.

use std::time::Duration;

use caml_wgpu::gpu::gpu;
use caml_wgpu::ops::conv::{self, BenchPreset, Pass};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn conv_kernels(c: &mut Criterion) {
    for case in conv::bench_cases(BenchPreset::Small) {
        let ops = conv::bench_operands(&case);
        let mut group = c.benchmark_group(case.label());
        group.throughput(Throughput::Elements(case.flops() as u64));
        group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        for pass in [Pass::Forward, Pass::BackwardData, Pass::BackwardWeight] {
            let name = match pass {
                Pass::Forward => "forward",
                Pass::BackwardData => "backward_data",
                Pass::BackwardWeight => "backward_weight",
            };
            gpu().read(conv::bench_pass(&case, pass, &ops).buffer(), 0, 4);
            group.bench_function(name, |b| {
                b.iter(|| gpu().read(conv::bench_pass(&case, pass, &ops).buffer(), 0, 4));
            });
        }
        group.finish();
    }
}

criterion_group!(benches, conv_kernels);
criterion_main!(benches);

//! Engine benchmarks: matmul (GFLOP/s), softmax and reductions (GB/s), one dispatch's overhead.
//! Each measured iteration records the op and waits for the device to finish it.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;
use caml_wgpu::gradcheck::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

fn random(shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(&Rng::new(1).vec(n, -1.0, 1.0), shape)
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for &(b, m, k, n) in &[(1, 256, 256, 256), (1, 512, 512, 512), (16, 1960, 32, 32)] {
        let (x, y) = (random(&[b, m, k]), random(&[b, k, n]));
        // Throughput in elements = floating-point operations: criterion's "elem/s" reads as FLOP/s.
        g.throughput(Throughput::Elements((2 * b * m * k * n) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("{b}x{m}x{k}x{n}")), |bench| {
            bench.iter(|| {
                let _ = x.matmul(&y);
                gpu().sync();
            })
        });
    }
    g.finish();
}

fn softmax_and_reductions(c: &mut Criterion) {
    let mut g = c.benchmark_group("softmax_reduce");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let rows = random(&[4096, 512]);
    // Bytes moved: read once, write once.
    g.throughput(Throughput::Bytes(2 * rows.bytes()));
    g.bench_function("softmax_rows_4096x512", |b| {
        b.iter(|| {
            let _ = rows.softmax(1);
            gpu().sync();
        })
    });
    let vol = random(&[4, 2, 64, 64, 48]);
    g.throughput(Throughput::Bytes(2 * vol.bytes()));
    g.bench_function("softmax_channels_4x2x64x64x48", |b| {
        b.iter(|| {
            let _ = vol.softmax(1);
            gpu().sync();
        })
    });
    let big = random(&[1 << 22]);
    g.throughput(Throughput::Bytes(big.bytes()));
    g.bench_function("sum_all_4M", |b| {
        b.iter(|| {
            let _ = big.sum_all();
            gpu().sync();
        })
    });
    g.throughput(Throughput::Bytes(vol.bytes()));
    g.bench_function("sum_axes_0_2_3_4", |b| {
        b.iter(|| {
            let _ = vol.sum(&[0, 2, 3, 4], false);
            gpu().sync();
        })
    });
    g.finish();
}

fn dispatch_overhead(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let t = Tensor::zeros(&[1]);
    g.bench_function("one_tiny_dispatch_recorded", |b| {
        b.iter(|| caml_wgpu::ops::elementwise::fill(&t, 1.0));
        gpu().sync();
    });
    g.bench_function("one_tiny_dispatch_and_sync", |b| {
        b.iter(|| {
            caml_wgpu::ops::elementwise::fill(&t, 1.0);
            gpu().sync();
        })
    });
    g.finish();
}

criterion_group!(benches, matmul, softmax_and_reductions, dispatch_overhead);
criterion_main!(benches);

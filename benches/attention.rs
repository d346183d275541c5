//! CMA benchmarks at the model's sizes (d = 128, 4 heads, x4 of 4 samples x 14 x 14 x 10 voxels):
//! the fused attention core and the whole TransformerEncoderLayer, intra-sample (4 sequences of
//! 1960 tokens) and inter-sample (1960 sequences of 4 tokens), forward and forward + backward,
//! with training-mode dropout. Throughput is in floating-point operations (criterion's "elem/s"
//! reads as FLOP/s); each measured iteration waits for the device. Peak GPU memory of one
//! iteration is printed before each measurement.

use std::time::Duration;

use caml_wgpu::gpu::gpu;
use caml_wgpu::gradcheck::Rng;
use caml_wgpu::nn::transformer::TransformerEncoderLayer;
use caml_wgpu::ops::attention::{HashDropout, attention};
use caml_wgpu::{Tensor, backward};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

const D: usize = 128;
const HEADS: usize = 4;
const FF: usize = 512;
/// (name, sequences, tokens per sequence)
const CASES: [(&str, usize, usize); 2] = [("intra_4x1960", 4, 1960), ("inter_1960x4", 1960, 4)];

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(&Rng::new(seed).vec(n, -1.0, 1.0), shape)
}

/// Bytes allocated at the peak of `f`, beyond what was live before it.
fn peak_bytes(f: impl FnOnce()) -> u64 {
    gpu().sync();
    let before = gpu().memory().in_use;
    gpu().reset_peak_memory();
    f();
    gpu().sync();
    gpu().memory().peak_in_use - before
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Multiply-adds of attention (q k^T and p v) counted as 2 operations each.
fn attention_flops(s: usize, l: usize) -> u64 {
    (4 * s * l * l * D) as u64
}

/// The layer's projections and feed-forward (2 operations per multiply-add) plus attention.
fn layer_flops(s: usize, l: usize) -> u64 {
    let tokens = (s * l) as u64;
    2 * tokens * (D * 3 * D + D * D + 2 * D * FF) as u64 + attention_flops(s, l)
}

fn fused_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_fused");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(8));
    let dropout = Some(HashDropout { p: 0.5, seed: 1 });
    for (name, s, l) in CASES {
        let qkv = random(&[s, l, 3 * D], 2).into_variable();
        let fwd = || {
            let _ = attention(&qkv, HEADS, dropout);
            gpu().sync();
        };
        let fwd_bwd = || {
            let y = attention(&qkv, HEADS, dropout);
            let grads = backward(&y.sum_all());
            drop(grads);
            gpu().sync();
        };
        eprintln!(
            "attention_fused/{name}: peak memory forward {:.1} MiB, forward + backward {:.1} MiB",
            mib(peak_bytes(fwd)),
            mib(peak_bytes(fwd_bwd))
        );
        g.throughput(Throughput::Elements(attention_flops(s, l)));
        g.bench_function(BenchmarkId::new("forward", name), |b| b.iter(fwd));
        // The backward's nominal work is 2.5 times the forward's (five products instead of two).
        g.throughput(Throughput::Elements(attention_flops(s, l) * 7 / 2));
        g.bench_function(BenchmarkId::new("forward_backward", name), |b| b.iter(fwd_bwd));
    }
    g.finish();
}

fn encoder_layer(c: &mut Criterion) {
    let mut g = c.benchmark_group("encoder_layer");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(8));
    let layer = TransformerEncoderLayer::new(D, HEADS, FF, 0.5, &mut Rng::new(3));
    for (name, s, l) in CASES {
        let x = random(&[s, l, D], 4).into_variable();
        let fwd = || {
            let _ = layer.forward(&x, Some(5));
            gpu().sync();
        };
        let fwd_bwd = || {
            let y = layer.forward(&x, Some(5));
            let grads = backward(&y.sum_all());
            drop(grads);
            gpu().sync();
        };
        eprintln!(
            "encoder_layer/{name}: peak memory forward {:.1} MiB, forward + backward {:.1} MiB",
            mib(peak_bytes(fwd)),
            mib(peak_bytes(fwd_bwd))
        );
        g.throughput(Throughput::Elements(layer_flops(s, l)));
        g.bench_function(BenchmarkId::new("forward", name), |b| b.iter(fwd));
        g.throughput(Throughput::Elements(layer_flops(s, l) * 3));
        g.bench_function(BenchmarkId::new("forward_backward", name), |b| b.iter(fwd_bwd));
    }
    g.finish();
}

criterion_group!(benches, fused_attention, encoder_layer);
criterion_main!(benches);

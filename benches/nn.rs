//! Throughput of the non-convolution layers, in bytes of unavoidable traffic per second: each
//! kernel family's reads and writes counted once (BatchNorm's training forward reads x twice,
//! once for the statistics and once to normalize). Every iteration waits for the GPU.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use caml_wgpu::gpu::gpu;
use caml_wgpu::gradcheck::Rng;
use caml_wgpu::ops::batchnorm::{BatchNormState, batch_norm, batch_norm_grad};
use caml_wgpu::ops::dropout::dropout3d;
use caml_wgpu::ops::linear::linear;
use caml_wgpu::ops::matmul::with_b_in_registers;
use caml_wgpu::ops::upsample::{upsample_trilinear2x, upsample_trilinear2x_grad};
use caml_wgpu::{Tensor, no_grad};

/// Waits until `t` has been computed.
fn wait(t: &Tensor) {
    gpu().read(t.buffer(), 0, 4);
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(&Rng::new(seed).vec(shape.iter().product(), -1.0, 1.0), shape)
}

fn bench_batchnorm(c: &mut Criterion) {
    // Encoder stage 2 at the paper's patch ([4, 32, 56, 56, 40], 16 MiB per sample), then the
    // small preset's five levels (width 4, patch 48 x 48 x 32): the reductions' fixed costs show
    // on the small ones.
    let shapes: [[usize; 5]; 6] = [
        [4, 32, 56, 56, 40],
        [4, 4, 48, 48, 32],
        [4, 8, 24, 24, 16],
        [4, 16, 12, 12, 8],
        [4, 32, 6, 6, 4],
        [4, 64, 3, 3, 2],
    ];
    for shape in shapes {
        bench_batchnorm_shape(c, shape);
    }
}

fn bench_batchnorm_shape(c: &mut Criterion, shape: [usize; 5]) {
    let x = random(&shape, 1);
    let dy = random(&shape, 2);
    let ch = shape[1];
    let (w, b) = (Tensor::full(&[ch], 1.0), Tensor::zeros(&[ch]));
    let (rm, rv, count) = (Tensor::zeros(&[ch]), Tensor::full(&[ch], 1.0), Tensor::from_u32(&[0], &[]));
    let s = BatchNormState {
        weight: &w,
        bias: &b,
        running_mean: &rm,
        running_var: &rv,
        num_batches_tracked: &count,
        momentum: 0.1,
        eps: 1e-5,
    };
    let bytes = x.bytes();
    let mut g = c.benchmark_group(format!("batchnorm3d {shape:?}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(3 * bytes));
    g.bench_function("forward train + relu (fused)", |bch| {
        bch.iter(|| no_grad(|| wait(&batch_norm(&x, &s, true, true))))
    });
    g.throughput(Throughput::Bytes(5 * bytes));
    g.bench_function("forward train, then relu (composed)", |bch| {
        bch.iter(|| no_grad(|| wait(&batch_norm(&x, &s, true, false).relu())))
    });
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function("forward eval + relu", |bch| {
        bch.iter(|| no_grad(|| wait(&batch_norm(&x, &s, false, true))))
    });
    // Per-channel (mean, invstd, scale, bias) as the forward saves them; the values do not change the work.
    let stats = Tensor::from_vec(&[0.0, 1.0, 1.0, 0.0].repeat(ch), &[ch, 4]);
    g.throughput(Throughput::Bytes(5 * bytes));
    g.bench_function("backward train + relu", |bch| {
        bch.iter(|| no_grad(|| wait(&batch_norm_grad(&x, &w, &stats, &dy, true, true)[0])))
    });
    g.finish();
}

fn bench_dropout(c: &mut Criterion) {
    let shape = [4, 16, 112, 112, 20];
    let x = random(&shape, 3);
    let mut g = c.benchmark_group(format!("dropout3d {shape:?}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(2 * x.bytes()));
    g.bench_function("forward p=0.5", |bch| bch.iter(|| no_grad(|| wait(&dropout3d(&x, 0.5, 7, true)))));
    g.finish();
}

fn bench_upsample(c: &mut Criterion) {
    // decoder2's block_seven_up input: [4, 64, 28, 28, 20] -> [4, 64, 56, 56, 40].
    let shape = [4, 64, 28, 28, 20];
    let x = random(&shape, 4);
    let gy = random(&[4, 64, 56, 56, 40], 5);
    let mut g = c.benchmark_group(format!("upsample trilinear x2 {shape:?}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(9 * x.bytes()));
    g.bench_function("forward", |bch| bch.iter(|| no_grad(|| wait(&upsample_trilinear2x(&x)))));
    g.bench_function("backward (three axis gathers)", |bch| {
        bch.iter(|| no_grad(|| wait(&upsample_trilinear2x_grad(&gy, &shape))))
    });
    g.finish();
}

fn bench_linear(c: &mut Criterion) {
    // A projection head's first layer over 12800 rows, and a head's 32 -> 32 layer over the
    // small preset's consistent voxels; the tall kernel with B passed round by shuffles (a GPU's
    // default) and held in every lane's registers (a software device's).
    for (rows, inp, out) in [(12800, 16, 32), (120_000, 32, 32)] {
        let x = random(&[rows, inp], 6);
        let w = random(&[out, inp], 7);
        let b = random(&[out], 8);
        let mut g = c.benchmark_group(format!("linear {rows}x{inp}->{out}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(((rows * (inp + out) + out * inp + out) * 4) as u64));
        for (name, registers) in [("forward, B by shuffles", false), ("forward, B in registers", true)] {
            g.bench_function(name, |bch| {
                bch.iter(|| with_b_in_registers(registers, || no_grad(|| wait(&linear(&x, &w, Some(&b))))))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_batchnorm, bench_dropout, bench_upsample, bench_linear);
criterion_main!(benches);

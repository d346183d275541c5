//! The convolution benchmarks shared by benches/conv.rs and the command line: layer shapes of
//! the small and paper presets, and a timing loop over the three passes of each.

use std::time::Instant;

use super::{
    Form, conv_out_shape, conv_transpose3d, conv_transpose3d_input_grad, conv_transpose3d_weight_grad,
    conv3d, conv3d_input_grad, conv3d_weight_grad, last_algo,
};
use crate::gpu::gpu;
use crate::tensor::Tensor;

/// Shape sets of `bench_conv_kernels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchPreset {
    /// Batch 1, k3 p1 at 16 channels 48x64x64, 32 at 24x32x32, 128 at 10x14x14; transposed
    /// convolutions with the same channels and output sizes; the small training preset's layers
    /// (widths 4 to 64).
    Small,
    /// The network's layers at batch 4 (VNet widths 16 to 256 at 112x112x80 and below).
    Paper,
}

/// One convolution layer to benchmark.
#[derive(Clone, Copy, Debug)]
pub struct BenchCase {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    /// input spatial dims
    pub dims: [usize; 3],
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    /// conv_transpose3d (k2 s2) instead of conv3d
    pub transpose: bool,
}

impl BenchCase {
    fn conv(batch: usize, cin: usize, cout: usize, dims: [usize; 3], k: usize, stride: usize) -> Self {
        BenchCase { batch, cin, cout, dims, k, stride, padding: k / 2 * (k % 2), transpose: false }
    }
    fn up(batch: usize, cin: usize, cout: usize, dims: [usize; 3]) -> Self {
        BenchCase { batch, cin, cout, dims, k: 2, stride: 2, padding: 0, transpose: true }
    }
    pub fn x_shape(&self) -> [usize; 5] {
        [self.batch, self.cin, self.dims[0], self.dims[1], self.dims[2]]
    }
    pub fn w_shape(&self) -> [usize; 5] {
        let k = self.k;
        if self.transpose { [self.cin, self.cout, k, k, k] } else { [self.cout, self.cin, k, k, k] }
    }
    pub fn y_shape(&self) -> [usize; 5] {
        if self.transpose {
            let d = self.dims;
            [self.batch, self.cout, 2 * d[0], 2 * d[1], 2 * d[2]]
        } else {
            conv_out_shape(self.x_shape(), self.cout, self.k, self.stride, self.padding)
        }
    }
    /// Multiply-adds times two of one pass (forward, input gradient or weight gradient alike).
    pub fn flops(&self) -> f64 {
        let taps = self.k.pow(3) as f64;
        let (y, x) = (self.y_shape(), self.x_shape());
        if self.transpose {
            2.0 * (x.iter().product::<usize>() * self.cout) as f64 * taps
        } else {
            2.0 * (y.iter().product::<usize>() * self.cin) as f64 * taps
        }
    }
    pub fn label(&self) -> String {
        let d = self.dims;
        let op = if self.transpose {
            "convT".to_string()
        } else {
            format!("k{}s{}p{}", self.k, self.stride, self.padding)
        };
        format!("{op} {}->{} n{} {}x{}x{}", self.cin, self.cout, self.batch, d[0], d[1], d[2])
    }
}

pub fn bench_cases(preset: BenchPreset) -> Vec<BenchCase> {
    let c = BenchCase::conv;
    let up = BenchCase::up;
    match preset {
        BenchPreset::Small => vec![
            c(1, 16, 16, [48, 64, 64], 3, 1),
            c(1, 32, 32, [24, 32, 32], 3, 1),
            c(1, 128, 128, [10, 14, 14], 3, 1),
            up(1, 16, 16, [24, 32, 32]),
            up(1, 32, 32, [12, 16, 16]),
            up(1, 128, 128, [5, 7, 7]),
            c(2, 1, 4, [48, 48, 32], 3, 1),
            c(2, 4, 4, [48, 48, 32], 3, 1),
            c(2, 4, 8, [48, 48, 32], 2, 2),
            c(2, 8, 8, [24, 24, 16], 3, 1),
            c(2, 16, 16, [12, 12, 8], 3, 1),
            c(2, 32, 32, [6, 6, 4], 3, 1),
            c(2, 64, 64, [3, 3, 2], 3, 1),
            up(2, 8, 4, [24, 24, 16]),
            c(2, 4, 2, [48, 48, 32], 1, 1),
        ],
        BenchPreset::Paper => vec![
            c(4, 1, 16, [112, 112, 80], 3, 1),
            c(4, 16, 16, [112, 112, 80], 3, 1),
            c(4, 16, 32, [112, 112, 80], 2, 2),
            c(4, 32, 32, [56, 56, 40], 3, 1),
            c(4, 32, 64, [56, 56, 40], 2, 2),
            c(4, 64, 64, [28, 28, 20], 3, 1),
            c(4, 64, 128, [28, 28, 20], 2, 2),
            c(4, 128, 128, [14, 14, 10], 3, 1),
            c(4, 128, 256, [14, 14, 10], 2, 2),
            c(4, 256, 256, [7, 7, 5], 3, 1),
            up(4, 256, 128, [7, 7, 5]),
            up(4, 128, 64, [14, 14, 10]),
            up(4, 64, 32, [28, 28, 20]),
            up(4, 32, 16, [56, 56, 40]),
            c(4, 16, 2, [112, 112, 80], 1, 1),
        ],
    }
}

/// The three passes of a layer benchmarked separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    BackwardData,
    BackwardWeight,
}

/// One timed pass: the kernel launches, waited for by a 4-byte readback.
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    pub algo: String,
    pub median_s: f64,
    pub gflops: f64,
}

/// Random operands of a case: (x, w, b, dy).
pub fn bench_operands(case: &BenchCase) -> (Tensor, Tensor, Tensor, Tensor) {
    let mut rng = crate::gradcheck::Rng::new(1);
    let mut t = |s: &[usize]| Tensor::from_vec(&rng.vec(s.iter().product(), -1.0, 1.0), s);
    (t(&case.x_shape()), t(&case.w_shape()), t(&[case.cout]), t(&case.y_shape()))
}

/// Runs one pass of a case (no gradient recording) and returns its result.
pub fn bench_pass(case: &BenchCase, pass: Pass, ops: &(Tensor, Tensor, Tensor, Tensor)) -> Tensor {
    let (x, w, b, dy) = ops;
    crate::autograd::no_grad(|| match (case.transpose, pass) {
        (false, Pass::Forward) => conv3d(x, w, b, case.stride, case.padding),
        (false, Pass::BackwardData) => conv3d_input_grad(dy, w, x.shape(), case.stride, case.padding),
        (false, Pass::BackwardWeight) => conv3d_weight_grad(dy, x, case.k, case.stride, case.padding),
        (true, Pass::Forward) => conv_transpose3d(x, w, b),
        (true, Pass::BackwardData) => conv_transpose3d_input_grad(dy, w, x.shape()),
        (true, Pass::BackwardWeight) => conv_transpose3d_weight_grad(dy, x),
    })
}

/// Median time and GFLOP/s of every pass of every case of a preset, after one autotuned warm-up
/// run each; `reps` timed runs per pass.
pub fn bench_conv_kernels(preset: BenchPreset, reps: usize) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    for case in bench_cases(preset) {
        let ops = bench_operands(&case);
        for pass in [Pass::Forward, Pass::BackwardData, Pass::BackwardWeight] {
            gpu().read(bench_pass(&case, pass, &ops).buffer(), 0, 4);
            let mut times: Vec<f64> = (0..reps.max(1))
                .map(|_| {
                    let t0 = Instant::now();
                    let out = bench_pass(&case, pass, &ops);
                    gpu().read(out.buffer(), 0, 4);
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let median_s = times[times.len() / 2];
            let form = match (pass, case.transpose, (case.k, case.stride, case.padding)) {
                (Pass::BackwardWeight, _, _) => Form::Wgrad,
                (Pass::Forward, true, _) | (Pass::BackwardData, false, (2, 2, 0)) => Form::Up,
                _ => Form::Gather,
            };
            let algo = last_algo(form).map_or("-".into(), |a| a.to_string());
            rows.push(BenchRow {
                kernel: format!("{}{pass:?}", if case.transpose { "conv_transpose3d " } else { "conv3d " }),
                shape: case.label(),
                algo,
                median_s,
                gflops: case.flops() / median_s / 1e9,
            });
        }
    }
    rows
}

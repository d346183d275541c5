//! Trilinear x2 upsampling with align_corners=True (torch.nn.Upsample(scale_factor=2,
//! mode='trilinear', align_corners=True)) on [N, C, X, Y, Z], and its adjoint for the backward.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, plane_groups, range_binding};
use crate::tensor::Tensor;

/// Source-coordinate step along an axis of input size `n`: (n - 1) / (2n - 1), in f32 as PyTorch
/// computes it (0 for n = 1, where both outputs copy the one input).
fn axis_scale(n: usize) -> f32 {
    if n > 1 { (n - 1) as f32 / (2 * n - 1) as f32 } else { 0.0 }
}

/// [N, C, X, Y, Z] -> [N, C, 2X, 2Y, 2Z].
pub fn upsample_trilinear2x(x: &Tensor) -> Tensor {
    let &[n, c, sx, sy, sz] = x.shape() else {
        panic!("upsample_trilinear2x needs [N, C, X, Y, Z], got {:?}", x.shape())
    };
    let y = Tensor::empty(&[n, c, 2 * sx, 2 * sy, 2 * sz]);
    let plane = sx * sy * sz;
    for (p0, count) in plane_groups(n * c, &[plane, 8 * plane]) {
        let params = Params::new()
            .u(count * 8 * plane)
            .u(0)
            .u(0)
            .u(0)
            .f(axis_scale(sx))
            .f(axis_scale(sy))
            .f(axis_scale(sz));
        // One invocation per output, or per output vec4 when Z is a multiple of 4.
        let quads = sz.is_multiple_of(4);
        let kernel = Kernel::new("upsample", if quads { "up2x_z4" } else { "up2x" })
            .with("SX", sx as f64)
            .with("SY", sy as f64)
            .with("SZ", sz as f64);
        let n = count * 8 * plane;
        gpu().dispatch_1d(
            &kernel,
            params.bytes(),
            &[range_binding(x, p0 * plane, count * plane), range_binding(&y, p0 * 8 * plane, n)],
            if quads { n as u64 / 4 } else { n as u64 },
        );
    }
    Tensor::with_op(y, Op::Upsample2x { x: x.graph_handle() })
}

/// g [outer, 2n, inner] -> [outer, n, inner]: the adjoint of the interpolation along one axis.
fn adjoint_axis(g: &Tensor, outer: usize, n: usize, inner: usize) -> Tensor {
    let out = Tensor::empty(&[outer, n, inner]);
    for (o0, count) in plane_groups(outer, &[2 * n * inner, n * inner]) {
        let len = count * n * inner;
        let params = Params::new().u(len).u(0).u(0).u(0).f(axis_scale(n)).f(0.0).f(0.0);
        // vec4s along `inner` when it allows, else along the axis itself when it is the last one.
        let (entry, lanes) = match (inner % 4, n % 4) {
            (0, _) => ("adjoint_axis4", len / 4),
            (_, 0) if inner == 1 => ("adjoint_z4", len / 4),
            _ => ("adjoint_axis", len),
        };
        gpu().dispatch_1d(
            &Kernel::new("upsample", entry).with("N_IN", n as f64).with("INNER", inner as f64),
            params.bytes(),
            &[
                range_binding(g, o0 * 2 * n * inner, count * 2 * n * inner),
                range_binding(&out, o0 * n * inner, len),
            ],
            lanes as u64,
        );
    }
    out
}

/// The backward: the interpolation is a tensor product of per-axis maps, so its adjoint is the
/// per-axis adjoints applied in turn (Z first, where the tensor is largest).
pub fn upsample_trilinear2x_grad(g: &Tensor, x_shape: &[usize]) -> Tensor {
    let &[n, c, sx, sy, sz] = x_shape else { unreachable!("checked in the forward") };
    let p = n * c;
    let gz = adjoint_axis(g, p * 4 * sx * sy, sz, 1);
    let gy = adjoint_axis(&gz, p * 2 * sx, sy, sz);
    adjoint_axis(&gy, p, sx, sy * sz).reshape(x_shape)
}

/// CPU references (f64 weights and sums).
pub mod cpu {
    /// Per output index of one axis: (i0, i1, weight of i0, weight of i1). The source coordinate
    /// is rounded to f32 as PyTorch computes it (its ulp reaches 4e-6 at coordinate 55).
    fn taps(n: usize) -> Vec<(usize, usize, f64, f64)> {
        let scale = super::axis_scale(n);
        (0..2 * n)
            .map(|o| {
                let s = (scale * o as f32) as f64;
                let i0 = (s as usize).min(n - 1);
                let i1 = (i0 + 1).min(n - 1);
                let l1 = s - i0 as f64;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    }

    /// x [planes, X, Y, Z] -> [planes, 2X, 2Y, 2Z].
    pub fn upsample2x(x: &[f32], [planes, sx, sy, sz]: [usize; 4]) -> Vec<f32> {
        let (tx, ty, tz) = (taps(sx), taps(sy), taps(sz));
        let mut out = Vec::with_capacity(x.len() * 8);
        for p in 0..planes {
            let at = |i: usize, j: usize, k: usize| x[((p * sx + i) * sy + j) * sz + k] as f64;
            for &(x0, x1, wx0, wx1) in &tx {
                for &(y0, y1, wy0, wy1) in &ty {
                    for &(z0, z1, wz0, wz1) in &tz {
                        let mut v = 0.0;
                        for (xi, wx) in [(x0, wx0), (x1, wx1)] {
                            for (yi, wy) in [(y0, wy0), (y1, wy1)] {
                                for (zi, wz) in [(z0, wz0), (z1, wz1)] {
                                    v += wx * wy * wz * at(xi, yi, zi);
                                }
                            }
                        }
                        out.push(v as f32);
                    }
                }
            }
        }
        out
    }

    /// The adjoint as a scatter: every output gradient sent to its 8 sources with the weights.
    pub fn upsample2x_adjoint(g: &[f32], [planes, sx, sy, sz]: [usize; 4]) -> Vec<f32> {
        let (tx, ty, tz) = (taps(sx), taps(sy), taps(sz));
        let mut out = vec![0f64; planes * sx * sy * sz];
        let mut k = 0;
        for p in 0..planes {
            for &(x0, x1, wx0, wx1) in &tx {
                for &(y0, y1, wy0, wy1) in &ty {
                    for &(z0, z1, wz0, wz1) in &tz {
                        for (xi, wx) in [(x0, wx0), (x1, wx1)] {
                            for (yi, wy) in [(y0, wy0), (y1, wy1)] {
                                for (zi, wz) in [(z0, wz0), (z1, wz1)] {
                                    out[((p * sx + xi) * sy + yi) * sz + zi] += wx * wy * wz * g[k] as f64;
                                }
                            }
                        }
                        k += 1;
                    }
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }
}

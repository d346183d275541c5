//! Reference 3D convolutions: direct kernels, one invocation per output value, correct for any
//! size but not fast. Conv3d (cubic kernel, stride, zero padding) and ConvTranspose3d share three
//! kernels, since a transposed convolution is the input gradient of a convolution:
//! conv_transpose3d(x, w) with w [CI_t, CO_t, k, k, k] = conv3d's input gradient for a conv3d
//! with weight w read as [CO_conv = CI_t, CI_conv = CO_t, k, k, k].

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
use crate::tensor::Tensor;

/// (batch, channels, [X, Y, Z]) of a rank-5 tensor.
fn dims5(t: &Tensor, what: &str) -> (usize, usize, [usize; 3]) {
    let &[b, c, x, y, z] = t.shape() else { panic!("{what} needs [N, C, X, Y, Z], got {:?}", t.shape()) };
    (b, c, [x, y, z])
}

/// (out channels, in channels, k) of a cubic weight [CO, CI, k, k, k].
fn kernel_dims(w: &Tensor) -> (usize, usize, usize) {
    let &[co, ci, kx, ky, kz] = w.shape() else {
        panic!("conv weight must be [CO, CI, k, k, k], got {:?}", w.shape())
    };
    assert!(kx == ky && ky == kz, "conv weight {:?}: cubic kernels only", w.shape());
    (co, ci, kx)
}

#[allow(clippy::too_many_arguments)]
fn params(
    total: usize,
    batch: usize,
    ci: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ind: [usize; 3],
    outd: [usize; 3],
) -> Params {
    Params::new().u(total).u(batch).u(ci).u(co).u(k).u(stride).u(pad).u(0).dims8(&ind).dims8(&outd)
}

/// x [B, CI, I] * w [CO, CI, k^3] -> [B, CO, O], O = (I + 2p - k) / s + 1.
fn conv_fwd(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Tensor {
    let (batch, ci, ind) = dims5(x, "conv3d");
    let (co, wci, k) = kernel_dims(w);
    assert_eq!(ci, wci, "conv3d input has {ci} channels, weight {:?}", w.shape());
    assert!(
        ind.iter().all(|&d| d + 2 * pad >= k),
        "conv3d input {:?} smaller than the kernel {k}",
        x.shape()
    );
    let outd = ind.map(|d| (d + 2 * pad - k) / stride + 1);
    let y = Tensor::empty(&[batch, co, outd[0], outd[1], outd[2]]);
    let p = params(y.numel(), batch, ci, co, k, stride, pad, ind, outd);
    gpu().dispatch_1d(
        &Kernel::new("conv_ref", "conv_fwd").with("HAS_BIAS", bias.is_some() as u8 as f64),
        p.bytes(),
        &[x.binding(), w.binding(), bias.unwrap_or(w).binding(), y.binding()],
        y.numel() as u64,
    );
    y
}

/// dy [B, CO, O], w [CO, CI, k^3] -> [B, CI, ind]: the input gradient of `conv_fwd`, plus bias[ci].
fn conv_bwd_data(
    dy: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    ind: [usize; 3],
) -> Tensor {
    let (batch, co, outd) = dims5(dy, "conv3d input gradient");
    let (wco, ci, k) = kernel_dims(w);
    assert_eq!(co, wco, "{co} gradient channels for weight {:?}", w.shape());
    let dx = Tensor::empty(&[batch, ci, ind[0], ind[1], ind[2]]);
    let p = params(dx.numel(), batch, ci, co, k, stride, pad, ind, outd);
    gpu().dispatch_1d(
        &Kernel::new("conv_ref", "conv_bwd_data").with("HAS_BIAS", bias.is_some() as u8 as f64),
        p.bytes(),
        &[dy.binding(), w.binding(), bias.unwrap_or(w).binding(), dx.binding()],
        dx.numel() as u64,
    );
    dx
}

/// x [B, CI, I], dy [B, CO, O] -> dw [CO, CI, k^3]: the weight gradient of `conv_fwd`.
fn conv_bwd_weight(x: &Tensor, dy: &Tensor, k: usize, stride: usize, pad: usize) -> Tensor {
    let (batch, ci, ind) = dims5(x, "conv3d weight gradient");
    let (_, co, outd) = dims5(dy, "conv3d weight gradient");
    let dw = Tensor::empty(&[co, ci, k, k, k]);
    let p = params(dw.numel(), batch, ci, co, k, stride, pad, ind, outd);
    gpu().dispatch_1d(
        &Kernel::new("conv_ref", "conv_bwd_weight"),
        p.bytes(),
        &[x.binding(), dy.binding(), dw.binding()],
        dw.numel() as u64,
    );
    dw
}

/// torch.nn.functional.conv3d: x `[N, CI, X, Y, Z]`, w `[CO, CI, k, k, k]`, b `[CO]`, zero padding.
pub fn conv3d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Tensor {
    assert_eq!(b.numel(), w.dim(0), "conv3d bias of shape {:?} for weight {:?}", b.shape(), w.shape());
    let y = conv_fwd(x, w, Some(b), stride, padding);
    let op = Op::ConvRef { x: x.clone(), w: w.clone(), b: b.clone(), stride, padding, transposed: false };
    Tensor::with_op(y, op)
}

/// torch.nn.functional.conv_transpose3d with stride equal to the kernel size and no padding (the
/// network's k2 s2 upsampling): x `[N, CI, X, Y, Z]`, w `[CI, CO, k, k, k]`, b `[CO]` ->
/// `[N, CO, kX, kY, kZ]`.
pub fn conv_transpose3d(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let (_, _, k) = kernel_dims(w);
    conv_transpose3d_strided(x, w, b, k, 0)
}

/// torch.nn.functional.conv_transpose3d, output [N, CO, (I - 1) * s - 2p + k] per axis.
pub fn conv_transpose3d_strided(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Tensor {
    let (_, _, ind) = dims5(x, "conv_transpose3d");
    let (_, co, k) = kernel_dims(w);
    assert_eq!(b.numel(), co, "conv_transpose3d bias of shape {:?} for weight {:?}", b.shape(), w.shape());
    assert!(
        ind.iter().all(|&d| (d - 1) * stride + k > 2 * padding),
        "conv_transpose3d output would be empty"
    );
    let outd = ind.map(|d| (d - 1) * stride + k - 2 * padding);
    let y = conv_bwd_data(x, w, Some(b), stride, padding, outd);
    let op = Op::ConvRef { x: x.clone(), w: w.clone(), b: b.clone(), stride, padding, transposed: true };
    Tensor::with_op(y, op)
}

/// Gradients of (x, w, b) given dy.
pub(crate) fn conv_ref_grad(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    padding: usize,
    transposed: bool,
) -> [Tensor; 3] {
    let k = w.dim(2);
    let db = dy.sum(&[0, 2, 3, 4], false);
    if transposed {
        // y = conv_bwd_data(x, w): dx = conv_fwd(dy, w), dw from the roles of input and output swapped.
        let dx = conv_fwd(dy, w, None, stride, padding);
        let dw = conv_bwd_weight(dy, x, k, stride, padding);
        [dx, dw, db]
    } else {
        let (_, _, ind) = dims5(x, "conv3d");
        let dx = conv_bwd_data(dy, w, None, stride, padding, ind);
        let dw = conv_bwd_weight(x, dy, k, stride, padding);
        [dx, dw, db]
    }
}

/// CPU references (f64 sums).
pub mod cpu {
    /// x `[B, CI, I]`, w `[CO, CI, k^3]`, b `[CO]` -> (`[B, CO, O]`, O).
    pub fn conv3d(
        x: &[f32],
        [batch, ci, ix, iy, iz]: [usize; 5],
        w: &[f32],
        [co, k]: [usize; 2],
        b: &[f32],
        stride: usize,
        pad: usize,
    ) -> (Vec<f32>, [usize; 3]) {
        let o = [ix, iy, iz].map(|d| (d + 2 * pad - k) / stride + 1);
        let mut y = Vec::with_capacity(batch * co * o[0] * o[1] * o[2]);
        let src = |d: usize, kk: usize, n: usize| (d * stride + kk).checked_sub(pad).filter(|&v| v < n);
        for bi in 0..batch {
            for c in 0..co {
                for ox in 0..o[0] {
                    for oy in 0..o[1] {
                        for oz in 0..o[2] {
                            let mut acc = b[c] as f64;
                            for cin in 0..ci {
                                for kx in 0..k {
                                    let Some(sx) = src(ox, kx, ix) else { continue };
                                    for ky in 0..k {
                                        let Some(sy) = src(oy, ky, iy) else { continue };
                                        for kz in 0..k {
                                            let Some(sz) = src(oz, kz, iz) else { continue };
                                            let xv = x[(((bi * ci + cin) * ix + sx) * iy + sy) * iz + sz];
                                            let wv = w[(((c * ci + cin) * k + kx) * k + ky) * k + kz];
                                            acc += xv as f64 * wv as f64;
                                        }
                                    }
                                }
                            }
                            y.push(acc as f32);
                        }
                    }
                }
            }
        }
        (y, o)
    }

    /// x `[B, CI, I]`, w `[CI, CO, k^3]`, b `[CO]` -> (`[B, CO, O]`, O), O = (I - 1) * s + k (no padding):
    /// every input value scattered through the kernel.
    pub fn conv_transpose3d(
        x: &[f32],
        [batch, ci, ix, iy, iz]: [usize; 5],
        w: &[f32],
        [co, k]: [usize; 2],
        b: &[f32],
        stride: usize,
    ) -> (Vec<f32>, [usize; 3]) {
        let o = [ix, iy, iz].map(|d| (d - 1) * stride + k);
        let plane = o[0] * o[1] * o[2];
        let mut y = vec![0f64; batch * co * plane];
        for bi in 0..batch {
            for c in 0..co {
                y[(bi * co + c) * plane..(bi * co + c + 1) * plane].fill(b[c] as f64);
            }
            for cin in 0..ci {
                for sx in 0..ix {
                    for sy in 0..iy {
                        for sz in 0..iz {
                            let xv = x[(((bi * ci + cin) * ix + sx) * iy + sy) * iz + sz] as f64;
                            for c in 0..co {
                                for kx in 0..k {
                                    for ky in 0..k {
                                        for kz in 0..k {
                                            let wv = w[(((cin * co + c) * k + kx) * k + ky) * k + kz] as f64;
                                            let (px, py, pz) =
                                                (sx * stride + kx, sy * stride + ky, sz * stride + kz);
                                            y[(bi * co + c) * plane + (px * o[1] + py) * o[2] + pz] +=
                                                xv * wv;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (y.into_iter().map(|v| v as f32).collect(), o)
    }
}

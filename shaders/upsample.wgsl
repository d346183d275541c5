// Trilinear x2 upsampling with align_corners=True, as torch.nn.Upsample(scale_factor=2,
// mode='trilinear', align_corners=True): along each axis of input size n, output index o reads the
// source coordinate s = o * (n - 1) / (2n - 1) (computed in f32 as PyTorch does), between
// i0 = floor(s) and i1 = min(i0 + 1, n - 1) with weights 1 - (s - i0) and s - i0.

struct Params {
    // elements written by this launch, the source step along (X, Y, Z) (forward) or the axis (adjoint)
    n: u32,
    scale: vec3<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;

// Sizes are pipeline constants, so that the index arithmetic divides by constants (a multiply
// and a shift) rather than by runtime values. Forward: the input's (X, Y, Z); adjoint: the axis'
// input size and the elements after it.
override SX: u32 = 1u;
override SY: u32 = 1u;
override SZ: u32 = 1u;
override N_IN: u32 = 1u;
override INNER: u32 = 1u;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

struct Taps {
    i0: u32,
    i1: u32,
    l0: f32,
    l1: f32,
}

fn taps(o: u32, n_in: u32, scale: f32) -> Taps {
    let s = scale * f32(o);
    let i0 = u32(s);
    let i1 = select(i0, i0 + 1u, i0 < n_in - 1u);
    let l1 = s - f32(i0);
    return Taps(i0, i1, 1.0 - l1, l1);
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// x [planes, X, Y, Z] -> y [planes, 2X, 2Y, 2Z]; one invocation per output.
@compute @workgroup_size(256)
fn up2x(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let oz = t % (2u * SZ);
    let oy = (t / (2u * SZ)) % (2u * SY);
    let r = t / (4u * SY * SZ);
    let ox = r % (2u * SX);
    let base = (r / (2u * SX)) * SX * SY * SZ;
    let tx = taps(ox, SX, p.scale.x);
    let ty = taps(oy, SY, p.scale.y);
    let tz = taps(oz, SZ, p.scale.z);
    let x0 = base + tx.i0 * SY * SZ;
    let x1 = base + tx.i1 * SY * SZ;
    let y0 = ty.i0 * SZ;
    let y1 = ty.i1 * SZ;
    // The nesting order of PyTorch's kernel, so that rounding matches it closely.
    y[t] = tx.l0 * (ty.l0 * (tz.l0 * x[x0 + y0 + tz.i0] + tz.l1 * x[x0 + y0 + tz.i1])
                  + ty.l1 * (tz.l0 * x[x0 + y1 + tz.i0] + tz.l1 * x[x0 + y1 + tz.i1]))
         + tx.l1 * (ty.l0 * (tz.l0 * x[x1 + y0 + tz.i0] + tz.l1 * x[x1 + y0 + tz.i1])
                  + ty.l1 * (tz.l0 * x[x1 + y1 + tz.i0] + tz.l1 * x[x1 + y1 + tz.i1]));
}

// The adjoint along one axis, as a gather (deterministic, no atomics): g [outer, 2n, inner] ->
// gx [outer, n, inner] with n = N_IN, inner = INNER, scale.x = the axis' step. Input index i
// receives from the outputs o whose i0 or i1 is i, which lie in [2i - 2, 2i + 3]: with
// s = (n - 1) / (2n - 1), (2i - 3) s < i - 3/2 and, for i < n - 1, (2i + 4) s >= i + 1 + 1/3, margins
// far above f32 rounding.
@compute @workgroup_size(256)
fn adjoint_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let n_in = N_IN;
    let inner = INNER;
    let k = t % inner;
    let i = (t / inner) % n_in;
    let outer = t / (inner * n_in);
    let n_out = 2u * n_in;
    let base = outer * n_out * inner + k;
    let lo = max(2u * i, 2u) - 2u;
    let hi = min(2u * i + 4u, n_out);
    var acc = 0.0;
    for (var o = lo; o < hi; o++) {
        let tp = taps(o, n_in, p.scale.x);
        let w = select(0.0, tp.l0, tp.i0 == i) + select(0.0, tp.l1, tp.i1 == i);
        if w != 0.0 {
            acc += w * x[base + o * inner];
        }
    }
    y[t] = acc;
}

// The vec4 kernels below need Z (the input's last axis) to be a multiple of 4, so that rows of
// both input and output start on vec4 boundaries.

@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;

// Element i (< 8) of the pair of vec4s (a, b).
fn pick(a: vec4<f32>, b: vec4<f32>, i: u32) -> f32 {
    return select(b[i & 3u], a[i & 3u], i < 4u);
}

// up2x with one output vec4 (oz = 4j .. 4j + 3) per invocation. Those outputs read input z in
// [2j - 1, 2j + 2] (as scale < 1/2, with margins over 1/2 against rounding), which lie in the two
// input vec4s from the one holding max(2j - 1, 0): 8 vec4 loads for 4 outputs instead of 32 scalar
// loads. The X and Y weights combine the four rows first, then Z interpolates.
@compute @workgroup_size(256)
fn up2x_z4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n / 4u {
        return;
    }
    let zq = SZ / 4u;
    let j = t % (2u * zq);
    let oy = (t / (2u * zq)) % (2u * SY);
    let r = t / (4u * zq * SY);
    let ox = r % (2u * SX);
    let plane = r / (2u * SX);
    let tx = taps(ox, SX, p.scale.x);
    let ty = taps(oy, SY, p.scale.y);
    let qa = (max(2u * j, 1u) - 1u) / 4u;
    let qb = min(qa + 1u, zq - 1u);
    let row00 = ((plane * SX + tx.i0) * SY + ty.i0) * zq;
    let row01 = ((plane * SX + tx.i0) * SY + ty.i1) * zq;
    let row10 = ((plane * SX + tx.i1) * SY + ty.i0) * zq;
    let row11 = ((plane * SX + tx.i1) * SY + ty.i1) * zq;
    let ca = tx.l0 * (ty.l0 * x4[row00 + qa] + ty.l1 * x4[row01 + qa])
           + tx.l1 * (ty.l0 * x4[row10 + qa] + ty.l1 * x4[row11 + qa]);
    let cb = tx.l0 * (ty.l0 * x4[row00 + qb] + ty.l1 * x4[row01 + qb])
           + tx.l1 * (ty.l0 * x4[row10 + qb] + ty.l1 * x4[row11 + qb]);
    let e0 = qa * 4u;
    var out = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let tz = taps(4u * j + k, SZ, p.scale.z);
        out[k] = tz.l0 * pick(ca, cb, tz.i0 - e0) + tz.l1 * pick(ca, cb, tz.i1 - e0);
    }
    y4[t] = out;
}

// adjoint_axis along the last axis (inner = 1) with n a multiple of 4: one vec4 of input
// positions i = 4m .. 4m + 3 per invocation. They receive from outputs o in [8m - 2, 8m + 9],
// which lie in the four output vec4s 2m - 1 .. 2m + 2.
@compute @workgroup_size(256)
fn adjoint_z4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n / 4u {
        return;
    }
    let n_in = N_IN;
    let nq = n_in / 4u;
    let m = t % nq;
    let row = (t / nq) * 2u * nq;
    var acc = vec4<f32>(0.0);
    for (var dq = 0u; dq < 4u; dq++) {
        // Output vec4 2m - 1 + dq, skipped outside the row.
        let q = 2u * m + dq;
        if q == 0u || q > 2u * nq {
            continue;
        }
        let g = x4[row + q - 1u];
        // Of the first and last vec4 only the elements 8m - 2, 8m - 1 and 8m + 8, 8m + 9 contribute.
        let e_lo = select(0u, 2u, dq == 0u);
        let e_hi = select(4u, 2u, dq == 3u);
        for (var e = e_lo; e < e_hi; e++) {
            let tp = taps((q - 1u) * 4u + e, n_in, p.scale.x);
            let k0 = tp.i0 - 4u * m;
            let k1 = tp.i1 - 4u * m;
            if k0 < 4u {
                acc[k0] += tp.l0 * g[e];
            }
            if k1 < 4u {
                acc[k1] += tp.l1 * g[e];
            }
        }
    }
    y4[t] = acc;
}

// adjoint_axis with inner a multiple of 4: one vec4 of inner positions per invocation.
@compute @workgroup_size(256)
fn adjoint_axis4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n / 4u {
        return;
    }
    let n_in = N_IN;
    let inner4 = INNER / 4u;
    let k = t % inner4;
    let i = (t / inner4) % n_in;
    let outer = t / (inner4 * n_in);
    let n_out = 2u * n_in;
    let base = outer * n_out * inner4 + k;
    let lo = max(2u * i, 2u) - 2u;
    let hi = min(2u * i + 4u, n_out);
    var acc = vec4<f32>(0.0);
    for (var o = lo; o < hi; o++) {
        let tp = taps(o, n_in, p.scale.x);
        let w = select(0.0, tp.l0, tp.i0 == i) + select(0.0, tp.l1, tp.i1 == i);
        if w != 0.0 {
            acc += w * x4[base + o * inner4];
        }
    }
    y4[t] = acc;
}

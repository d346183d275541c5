// Trilinear x2 upsampling with align_corners=True, as torch.nn.Upsample(scale_factor=2,
// mode='trilinear', align_corners=True): along each axis of input size n, output index o reads the
// source coordinate s = o * (n - 1) / (2n - 1) (computed in f32 as PyTorch does), between
// i0 = floor(s) and i1 = min(i0 + 1, n - 1) with weights 1 - (s - i0) and s - i0.

struct Params {
    // forward: output elements in this launch and the input sizes; adjoint: see `adjoint_axis`
    n: u32,
    a: u32,
    b: u32,
    c: u32,
    scale: vec3<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;

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

// x [planes, X, Y, Z] -> y [planes, 2X, 2Y, 2Z], (a, b, c) = (X, Y, Z); one invocation per output.
@compute @workgroup_size(256)
fn up2x(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let oz = t % (2u * p.c);
    let oy = (t / (2u * p.c)) % (2u * p.b);
    let r = t / (4u * p.b * p.c);
    let ox = r % (2u * p.a);
    let base = (r / (2u * p.a)) * p.a * p.b * p.c;
    let tx = taps(ox, p.a, p.scale.x);
    let ty = taps(oy, p.b, p.scale.y);
    let tz = taps(oz, p.c, p.scale.z);
    let x0 = base + tx.i0 * p.b * p.c;
    let x1 = base + tx.i1 * p.b * p.c;
    let y0 = ty.i0 * p.c;
    let y1 = ty.i1 * p.c;
    // The nesting order of PyTorch's kernel, so that rounding matches it closely.
    y[t] = tx.l0 * (ty.l0 * (tz.l0 * x[x0 + y0 + tz.i0] + tz.l1 * x[x0 + y0 + tz.i1])
                  + ty.l1 * (tz.l0 * x[x0 + y1 + tz.i0] + tz.l1 * x[x0 + y1 + tz.i1]))
         + tx.l1 * (ty.l0 * (tz.l0 * x[x1 + y0 + tz.i0] + tz.l1 * x[x1 + y0 + tz.i1])
                  + ty.l1 * (tz.l0 * x[x1 + y1 + tz.i0] + tz.l1 * x[x1 + y1 + tz.i1]));
}

// The adjoint along one axis, as a gather (deterministic, no atomics): g [outer, 2n, inner] ->
// gx [outer, n, inner], (a, b, c) = (n, inner, unused), scale.x = the axis' scale. Input index i
// receives from the outputs o whose i0 or i1 is i; as scale < 1/2 these lie in [2i - 3, 2i + 5].
@compute @workgroup_size(256)
fn adjoint_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let n_in = p.a;
    let inner = p.b;
    let k = t % inner;
    let i = (t / inner) % n_in;
    let outer = t / (inner * n_in);
    let n_out = 2u * n_in;
    let base = outer * n_out * inner + k;
    let lo = max(2u * i, 3u) - 3u;
    let hi = min(2u * i + 6u, n_out);
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

// Reductions along one axis of a tensor seen as [outer, r, inner]: sums (in chunks, so that a
// long axis still spreads over many invocations), max with argmax, softmax and log-softmax, and
// the gradients of the last three. One invocation per (outer, chunk, inner) position.

struct Params {
    outer: u32,
    r: u32,
    inner: u32,
    chunks: u32,
    chunk_len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override LOG: bool = false;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// y[o, c, i] = sum over r in chunk c of x[o, r, i]
@compute @workgroup_size(256)
fn sum_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.chunks * p.inner {
        return;
    }
    let i = t % p.inner;
    let c = (t / p.inner) % p.chunks;
    let o = t / (p.inner * p.chunks);
    let r0 = c * p.chunk_len;
    let r1 = min(r0 + p.chunk_len, p.r);
    var base = (o * p.r + r0) * p.inner + i;
    var acc = 0.0;
    for (var r = r0; r < r1; r++) {
        acc += x[base];
        base += p.inner;
    }
    y[t] = acc;
}

@group(0) @binding(3) var<storage, read_write> arg: array<f32>;

// y[o, i] = max over r of x[o, r, i]; arg = the first index reaching it (as f32).
@compute @workgroup_size(256)
fn max_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.inner {
        return;
    }
    let i = t % p.inner;
    let o = t / p.inner;
    let base = o * p.r * p.inner + i;
    var best = x[base];
    var at = 0u;
    for (var r = 1u; r < p.r; r++) {
        let v = x[base + r * p.inner];
        if v > best {
            best = v;
            at = r;
        }
    }
    y[t] = best;
    arg[t] = f32(at);
}

// Softmax (or log-softmax with LOG) along r.
@compute @workgroup_size(256)
fn softmax_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.inner {
        return;
    }
    let i = t % p.inner;
    let o = t / p.inner;
    let base = o * p.r * p.inner + i;
    var m = x[base];
    for (var r = 1u; r < p.r; r++) {
        m = max(m, x[base + r * p.inner]);
    }
    var s = 0.0;
    for (var r = 0u; r < p.r; r++) {
        s += exp(x[base + r * p.inner] - m);
    }
    if LOG {
        let ls = log(s) + m;
        for (var r = 0u; r < p.r; r++) {
            let k = base + r * p.inner;
            y[k] = x[k] - ls;
        }
    } else {
        let inv = 1.0 / s;
        for (var r = 0u; r < p.r; r++) {
            let k = base + r * p.inner;
            y[k] = exp(x[k] - m) * inv;
        }
    }
}

@group(0) @binding(1) var<storage, read> sy: array<f32>;
@group(0) @binding(2) var<storage, read> sg: array<f32>;
@group(0) @binding(3) var<storage, read_write> sgx: array<f32>;

// softmax: gx = y * (g - sum(g * y)); log-softmax: gx = g - exp(y) * sum(g).
@compute @workgroup_size(256)
fn softmax_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.inner {
        return;
    }
    let i = t % p.inner;
    let o = t / p.inner;
    let base = o * p.r * p.inner + i;
    var s = 0.0;
    for (var r = 0u; r < p.r; r++) {
        let k = base + r * p.inner;
        s += select(sg[k] * sy[k], sg[k], LOG);
    }
    for (var r = 0u; r < p.r; r++) {
        let k = base + r * p.inner;
        sgx[k] = select(sy[k] * (sg[k] - s), sg[k] - exp(sy[k]) * s, LOG);
    }
}

@group(0) @binding(1) var<storage, read> mg: array<f32>;
@group(0) @binding(2) var<storage, read> marg: array<f32>;
@group(0) @binding(3) var<storage, read_write> mgx: array<f32>;

// gx[o, r, i] = g[o, i] where r is the argmax, else 0.
@compute @workgroup_size(256)
fn max_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.r * p.inner {
        return;
    }
    let i = t % p.inner;
    let r = (t / p.inner) % p.r;
    let o = t / (p.inner * p.r);
    let k = o * p.inner + i;
    mgx[t] = select(0.0, mg[k], u32(marg[k]) == r);
}

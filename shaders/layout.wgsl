// Data movement: permute, copies along one axis (slice, concat, pad), row gather and
// scatter-add.

struct Params {
    n: u32,
    rank: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    f: u32,
    shape: array<vec4<u32>, 2>,
    strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;


fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// y has shape `shape`; `strides` are x's strides taken in y's axis order.
@compute @workgroup_size(256)
fn permute(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    var r = i;
    var src = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let s = p.shape[u32(d) >> 2u][u32(d) & 3u];
        src += (r % s) * p.strides[u32(d) >> 2u][u32(d) & 3u];
        r = r / s;
    }
    y[i] = x[src];
}

// y[o, dst_start + j, i] = x[o, src_start + j, i] for j < len.
// a = outer, b = len, c = inner, d = src axis size, e = src start, f = dst axis size,
// shape[0].x = dst start.
@compute @workgroup_size(256)
fn copy_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let i = t % p.c;
    let j = (t / p.c) % p.b;
    let o = t / (p.c * p.b);
    let dst_start = p.shape[0].x;
    y[(o * p.f + dst_start + j) * p.c + i] = x[(o * p.d + p.e + j) * p.c + i];
}

@group(0) @binding(1) var<storage, read> gx: array<f32>;
@group(0) @binding(2) var<storage, read> gidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> gy: array<f32>;

// gy[r, :] = gx[idx[r], :]; a = rows, b = cols.
@compute @workgroup_size(256)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let c = t % p.b;
    let r = t / p.b;
    gy[t] = gx[gidx[r] * p.b + c];
}

@group(0) @binding(1) var<storage, read> sg: array<f32>;
@group(0) @binding(2) var<storage, read> sidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> sout: array<atomic<u32>>;

// sout[idx[r], :] += sg[r, :], an f32 add through compare-exchange so repeated indices add up.
@compute @workgroup_size(256)
fn scatter_add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let c = t % p.b;
    let r = t / p.b;
    let k = sidx[r] * p.b + c;
    let v = sg[t];
    var old = atomicLoad(&sout[k]);
    loop {
        let res = atomicCompareExchangeWeak(&sout[k], old, bitcast<u32>(bitcast<f32>(old) + v));
        if res.exchanged {
            break;
        }
        old = res.old_value;
    }
}

@group(0) @binding(1) var<storage, read> ux: array<u32>;
@group(0) @binding(2) var<storage, read> uidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> uy: array<u32>;

// uy[r] = ux[idx[r]] for index vectors.
@compute @workgroup_size(256)
fn gather_u32(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    uy[t] = ux[uidx[t]];
}

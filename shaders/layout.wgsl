// Data movement as bit copies (f32 and u32 alike): strided box copies (permute, slice, concat,
// padding), row gather and scatter-add. Tensors are bound in windows that fit one storage
// binding; offsets say where a launch's first element sits in each window.

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
    xs: array<vec4<u32>, 2>,
    ys: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

// y[b + sum_d i_d * ys[d]] = x[a + sum_d i_d * xs[d]] for every index i of the box `shape`
// (`rank` axes). Each of the n invocations copies up to COPY_RUN consecutive elements of the last
// axis, so that the index arithmetic (integer divisions, slow on CPU devices) is shared.
const COPY_RUN: u32 = 8u;

@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let last = p.rank - 1u;
    let len = p.shape[last >> 2u][last & 3u];
    let runs = (len + COPY_RUN - 1u) / COPY_RUN;
    var r = t / runs;
    let i0 = (t - r * runs) * COPY_RUN;
    let xl = p.xs[last >> 2u][last & 3u];
    let yl = p.ys[last >> 2u][last & 3u];
    var src = p.a + i0 * xl;
    var dst = p.b + i0 * yl;
    for (var d = i32(last) - 1; d >= 0; d--) {
        let v = u32(d) >> 2u;
        let c = u32(d) & 3u;
        let s = p.shape[v][c];
        let i = r % s;
        r = r / s;
        src += i * p.xs[v][c];
        dst += i * p.ys[v][c];
    }
    for (var j = i0; j < min(i0 + COPY_RUN, len); j++) {
        y[dst] = x[src];
        src += xl;
        dst += yl;
    }
}

@group(0) @binding(1) var<storage, read> gx: array<u32>;
@group(0) @binding(2) var<storage, read> gidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> gy: array<u32>;

// A run of up to COPY_RUN columns of one indexed row: (row, first column).
fn row_run(t: u32) -> vec2<u32> {
    let runs = (p.f + COPY_RUN - 1u) / COPY_RUN;
    let r = t / runs;
    return vec2<u32>(r, (t - r * runs) * COPY_RUN);
}

// gy[a + r * f + col] = gx[b + (idx[c + r] - d) * f + col] for the output rows r whose source row
// idx falls in the window [d, d + e) of table rows bound at gx; f = cols. n invocations, one per
// run of columns.
@compute @workgroup_size(256)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let rc = row_run(t);
    let s = gidx[p.c + rc.x] - p.d;
    if s >= p.e {
        return;
    }
    let src = p.b + s * p.f;
    let dst = p.a + rc.x * p.f;
    for (var col = rc.y; col < min(rc.y + COPY_RUN, p.f); col++) {
        gy[dst + col] = gx[src + col];
    }
}

@group(0) @binding(1) var<storage, read> sg: array<f32>;
@group(0) @binding(2) var<storage, read> sidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> sout: array<atomic<u32>>;

// sout[b + (idx[c + r] - d) * f + col] += sg[a + r * f + col] for the rows whose destination
// falls in the window [d, d + e) of table rows bound at sout: f32 adds through compare-exchange,
// so that repeated indices add up. n invocations, one per run of columns.
@compute @workgroup_size(256)
fn scatter_add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let rc = row_run(t);
    let s = sidx[p.c + rc.x] - p.d;
    if s >= p.e {
        return;
    }
    for (var col = rc.y; col < min(rc.y + COPY_RUN, p.f); col++) {
        let k = p.b + s * p.f + col;
        let v = sg[p.a + rc.x * p.f + col];
        var old = atomicLoad(&sout[k]);
        loop {
            let res = atomicCompareExchangeWeak(&sout[k], old, bitcast<u32>(bitcast<f32>(old) + v));
            if res.exchanged {
                break;
            }
            old = res.old_value;
        }
    }
}

@group(0) @binding(1) var<storage, read> asrc: array<f32>;
@group(0) @binding(2) var<storage, read> aidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> aout: array<f32>;

// aout[b + (idx[c + r] - d) * f + col] += asrc[a + r * f + col], as scatter_rows for distinct
// indices: each destination row is written by one invocation, so plain adds suffice.
@compute @workgroup_size(256)
fn add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let rc = row_run(t);
    let s = aidx[p.c + rc.x] - p.d;
    if s >= p.e {
        return;
    }
    for (var col = rc.y; col < min(rc.y + COPY_RUN, p.f); col++) {
        aout[p.b + s * p.f + col] += asrc[p.a + rc.x * p.f + col];
    }
}

@group(0) @binding(1) var<storage, read> vx: array<u32>;
@group(0) @binding(2) var<storage, read> vidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> vy: array<u32>;

// The rows of an N, C, V tensor read across its channels: vy[r * f + c] = vx[a + s * f * e + c * e
// + i] for v = idx[r], s = v / e, i = v % e (f = C, e = V); n = rows.
@compute @workgroup_size(256)
fn gather_voxels(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let r = linear(gid, nw);
    if r >= p.n {
        return;
    }
    let v = vidx[r];
    let s = v / p.e;
    let src = p.a + s * p.f * p.e + (v - s * p.e);
    for (var c = 0u; c < p.f; c++) {
        vy[r * p.f + c] = vx[src + c * p.e];
    }
}

@group(0) @binding(1) var<storage, read> sv: array<u32>;
@group(0) @binding(2) var<storage, read> sidx2: array<u32>;
@group(0) @binding(3) var<storage, read_write> svy: array<u32>;

// gather_voxels' adjoint for distinct indices: svy at row idx[r]'s voxel = sv[r * f + c].
@compute @workgroup_size(256)
fn scatter_voxels(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let r = linear(gid, nw);
    if r >= p.n {
        return;
    }
    let v = sidx2[r];
    let s = v / p.e;
    let dst = p.a + s * p.f * p.e + (v - s * p.e);
    for (var c = 0u; c < p.f; c++) {
        svy[dst + c * p.e] = sv[r * p.f + c];
    }
}

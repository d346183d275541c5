// Reductions along the middle axis of a tensor seen as [outer, r, inner]: sums (in chunks of
// rows, so that a long axis still spreads over many invocations), max with argmax, softmax and
// log-softmax, and the gradients of the last three.
//
// A launch covers a box of lanes (o, c, i): lane (o, c, i) visits `rows` rows of the row-shaped
// tensors (x, softmax outputs and gradients), from global row row0 + c * chunk_len on, and reads
// or writes one element of the lane-shaped ones (sums, max, argmax). Strides and offsets locate
// the box in the windows the tensors are bound in; `accumulate` continues a lane's reduction from
// an earlier launch over its earlier rows.

struct Params {
    outer: u32,
    chunks: u32,
    inner: u32,
    rows: u32,
    x_outer: u32,
    x_chunk: u32,
    x_row: u32,
    y_outer: u32,
    y_chunk: u32,
    x_off: u32,
    y_off: u32,
    row0: u32,
    chunk_len: u32,
    r: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override LOG: bool = false;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

struct Lane {
    // Row-shaped index of the lane's first row, lane-shaped index, first global row, rows.
    x: u32,
    y: u32,
    row: u32,
    rows: u32,
}

fn lane(t: u32) -> Lane {
    let i = t % p.inner;
    let c = (t / p.inner) % p.chunks;
    let o = t / (p.inner * p.chunks);
    let row = p.row0 + c * p.chunk_len;
    return Lane(p.x_off + o * p.x_outer + c * p.x_chunk + i, p.y_off + o * p.y_outer + c * p.y_chunk + i, row,
        min(p.rows, p.r - min(row, p.r)));
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// y[o, c, i] (+)= sum of x[o, r, i] over the lane's rows.
@compute @workgroup_size(256)
fn sum_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.chunks * p.inner {
        return;
    }
    let l = lane(t);
    var k = l.x;
    var acc = 0.0;
    for (var j = 0u; j < l.rows; j++) {
        acc += x[k];
        k += p.x_row;
    }
    if p.accumulate != 0u {
        acc += y[l.y];
    }
    y[l.y] = acc;
}

@group(0) @binding(3) var<storage, read_write> arg: array<f32>;

// y[o, i] = max over r of x[o, r, i]; arg = the first global row reaching it (as f32).
@compute @workgroup_size(256)
fn max_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.inner {
        return;
    }
    let l = lane(t);
    var best = x[l.x];
    var at = l.row;
    for (var j = 1u; j < l.rows; j++) {
        let v = x[l.x + j * p.x_row];
        if v > best {
            best = v;
            at = l.row + j;
        }
    }
    if p.accumulate != 0u {
        let prev = y[l.y];
        if !(best > prev) {
            best = prev;
            at = u32(arg[l.y]);
        }
    }
    y[l.y] = best;
    arg[l.y] = f32(at);
}

// Softmax (or log-softmax with LOG) along r; y is row-shaped like x.
@compute @workgroup_size(256)
fn softmax_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.inner {
        return;
    }
    let base = lane(t).x;
    var m = x[base];
    for (var r = 1u; r < p.rows; r++) {
        m = max(m, x[base + r * p.x_row]);
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += exp(x[base + r * p.x_row] - m);
    }
    if LOG {
        let ls = log(s) + m;
        for (var r = 0u; r < p.rows; r++) {
            let k = base + r * p.x_row;
            y[k] = x[k] - ls;
        }
    } else {
        let inv = 1.0 / s;
        for (var r = 0u; r < p.rows; r++) {
            let k = base + r * p.x_row;
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
    let base = lane(t).x;
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let k = base + r * p.x_row;
        s += select(sg[k] * sy[k], sg[k], LOG);
    }
    for (var r = 0u; r < p.rows; r++) {
        let k = base + r * p.x_row;
        sgx[k] = select(sy[k] * (sg[k] - s), sg[k] - exp(sy[k]) * s, LOG);
    }
}

@group(0) @binding(1) var<storage, read> mg: array<f32>;
@group(0) @binding(2) var<storage, read> marg: array<f32>;
@group(0) @binding(3) var<storage, read_write> mgx: array<f32>;

// gx[o, r, i] = g[o, i] where r is the argmax, else 0: one invocation per element of the box
// (o, row j, i), j < rows.
@compute @workgroup_size(256)
fn max_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.rows * p.inner {
        return;
    }
    let i = t % p.inner;
    let j = (t / p.inner) % p.rows;
    let o = t / (p.inner * p.rows);
    let k = p.y_off + o * p.y_outer + i;
    mgx[p.x_off + o * p.x_outer + j * p.x_row + i] = select(0.0, mg[k], u32(marg[k]) == p.row0 + j);
}

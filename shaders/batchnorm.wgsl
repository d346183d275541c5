// BatchNorm over x seen as [outer, C, inner] (BatchNorm3d: [N, C, X*Y*Z]; BatchNorm1d: [rows, C, 1]),
// statistics per channel c over its M = outer * inner elements, optionally followed by ReLU.
//
// Training statistics take two launches: `stats_partial` gives one (count, mean, M2) triple per block
// of 4096 elements of a channel (Welford within an invocation, Chan's pairwise merge across the
// workgroup), `stats_finalize` merges a channel's blocks and updates the running statistics.
// Pairwise merging of centred moments keeps the variance accurate for inputs with a large mean,
// where sum(x^2) - sum(x)^2 / M in f32 would cancel.
//
// Each per-element kernel has a `...4` twin reading vec4s, used when `inner` is a multiple of 4 (a
// vec4 then never straddles two channels): on software devices a vec4 load costs what a scalar
// load does, and on GPUs it is a wider transaction. Where `inner` is a multiple of 16, `...16`
// twins take four vec4s of a channel per invocation (per-element kernels: the channel's
// statistics loaded once) or per step (reductions).
//
// Per channel, `stats` holds vec4(mean, invstd, weight * invstd, bias): y = (x - mean) * scale + bias.
// The backward mirrors the forward: `grad_partial` / `grad_finalize` reduce (sum dy, sum dy * xhat) per
// channel, `grad_input` applies dx = k * dy + a * (x - mean) + q per element.

struct Params {
    // samples in this launch, channels, elements per (sample, channel)
    outer: u32,
    c: u32,
    inner: u32,
    // elements per block, this launch's first block among a channel's blocks, blocks per channel
    block_len: u32,
    block0: u32,
    total_blocks: u32,
    // elements per channel over all launches
    m: u32,
    momentum: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

override RELU: bool = false;
override TRAIN: bool = true;

// Invocations of a workgroup; the per-channel reductions (`stats_partial*`, `grad_partial*`) may
// take fewer (a power of two) for channels of few elements, where the merge tree's barriers would
// cost more than the loads.
override WG: u32 = 256u;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * WG;
}

// (count, mean, M2) of the union of two sets.
fn merge(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if b.x == 0.0 {
        return a;
    }
    if a.x == 0.0 {
        return b;
    }
    let n = a.x + b.x;
    let d = b.y - a.y;
    let f = b.x / n;
    return vec4<f32>(n, a.y + d * f, a.z + b.z + d * d * a.x * f, 0.0);
}

var<workgroup> sh: array<vec4<f32>, 256>;

fn merge_workgroup(lid: u32, v: vec4<f32>) -> vec4<f32> {
    sh[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            sh[lid] = merge(sh[lid], sh[lid + s]);
        }
        workgroupBarrier();
    }
    return sh[0];
}

fn sum_workgroup(lid: u32, v: vec4<f32>) -> vec4<f32> {
    sh[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            sh[lid] = sh[lid] + sh[lid + s];
        }
        workgroupBarrier();
    }
    return sh[0];
}

// Walks a channel's elements j = (sample, position) with a stride of WG, dividing only when a
// step crosses into another sample (integer division is slow on every device).
struct Walk {
    o: u32,
    i: u32,
}

fn walk_start(j: u32, inner: u32) -> Walk {
    let o = j / inner;
    return Walk(o, j - o * inner);
}

fn walk_step(w: ptr<function, Walk>, inner: u32) {
    (*w).i += WG;
    if (*w).i >= inner {
        (*w).o += (*w).i / inner;
        (*w).i = (*w).i % inner;
    }
}

@group(0) @binding(1) var<storage, read> sx: array<f32>;
@group(0) @binding(2) var<storage, read_write> spart: array<vec4<f32>>;

// Workgroup (block, c): spart[c * total_blocks + block0 + block] = (count, mean, M2, 0).
@compute @workgroup_size(WG)
fn stats_partial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let start = wid.x * p.block_len;
    let end = min(start + p.block_len, p.outer * p.inner);
    var acc = vec4<f32>(0.0);
    var w = walk_start(start + lid, p.inner);
    for (var j = start + lid; j < end; j += WG) {
        let v = sx[(w.o * p.c + c) * p.inner + w.i];
        walk_step(&w, p.inner);
        acc.x += 1.0;
        let d = v - acc.y;
        acc.y += d / acc.x;
        acc.z += d * (v - acc.y);
    }
    let total = merge_workgroup(lid, acc);
    if lid == 0u {
        spart[c * p.total_blocks + p.block0 + wid.x] = total;
    }
}

@group(0) @binding(1) var<storage, read> sx4: array<vec4<f32>>;

// stats_partial over vec4s: four Welford lanes of equal count, merged at the end.
@compute @workgroup_size(WG)
fn stats_partial4(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let start = wid.x * p.block_len / 4u;
    let end = min(start + p.block_len / 4u, p.outer * p.inner / 4u);
    var n = 0.0;
    var mean = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    let inner4 = p.inner / 4u;
    var w = walk_start(start + lid, inner4);
    for (var q = start + lid; q < end; q += WG) {
        let v = sx4[(w.o * p.c + c) * inner4 + w.i];
        walk_step(&w, inner4);
        n += 1.0;
        let d = v - mean;
        mean += d / n;
        m2 += d * (v - mean);
    }
    store_lanes(lid, c, wid.x, n, mean, m2);
}

// Merges four Welford lanes of equal count n across the workgroup into the block's partial.
fn store_lanes(lid: u32, c: u32, block: u32, n: f32, mean: vec4<f32>, m2: vec4<f32>) {
    let lo = merge(vec4<f32>(n, mean.x, m2.x, 0.0), vec4<f32>(n, mean.y, m2.y, 0.0));
    let hi = merge(vec4<f32>(n, mean.z, m2.z, 0.0), vec4<f32>(n, mean.w, m2.w, 0.0));
    let total = merge_workgroup(lid, merge(lo, hi));
    if lid == 0u {
        spart[c * p.total_blocks + p.block0 + block] = total;
    }
}

// stats_partial4 over four vec4s of one sample a step (`inner` a multiple of 16).
@compute @workgroup_size(WG)
fn stats_partial16(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let start = wid.x * p.block_len / 16u;
    let end = min(start + p.block_len / 16u, p.outer * p.inner / 16u);
    var n = 0.0;
    var mean = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    let inner16 = p.inner / 16u;
    var w = walk_start(start + lid, inner16);
    for (var q = start + lid; q < end; q += WG) {
        let k = 4u * ((w.o * p.c + c) * inner16 + w.i);
        walk_step(&w, inner16);
        let v0 = sx4[k];
        let v1 = sx4[k + 1u];
        let v2 = sx4[k + 2u];
        let v3 = sx4[k + 3u];
        // The four vectors' own mean and M2, merged into the running ones (Chan).
        let qm = (v0 + v1 + v2 + v3) * 0.25;
        let d0 = v0 - qm;
        let d1 = v1 - qm;
        let d2 = v2 - qm;
        let d3 = v3 - qm;
        let qm2 = d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3;
        let nn = n + 4.0;
        let d = qm - mean;
        let f = 4.0 / nn;
        mean += d * f;
        m2 += qm2 + d * d * n * f;
        n = nn;
    }
    store_lanes(lid, c, wid.x, n, mean, m2);
}

@group(0) @binding(1) var<storage, read> fpart: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> fweight: array<f32>;
@group(0) @binding(3) var<storage, read> fbias: array<f32>;
@group(0) @binding(4) var<storage, read_write> fstats: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> frmean: array<f32>;
@group(0) @binding(6) var<storage, read_write> frvar: array<f32>;
@group(0) @binding(7) var<storage, read_write> fcount: array<u32>;

// Workgroup c: merges the channel's blocks; running = (1 - momentum) * running + momentum * batch,
// with the unbiased variance M2 / (M - 1) for running_var and the biased M2 / M for normalizing.
@compute @workgroup_size(256)
fn stats_finalize(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x;
    var acc = vec4<f32>(0.0);
    for (var b = lid; b < p.total_blocks; b += WG) {
        acc = merge(acc, fpart[c * p.total_blocks + b]);
    }
    let total = merge_workgroup(lid, acc);
    if lid == 0u {
        finish_stats(c, total);
    }
}

fn finish_stats(c: u32, total: vec4<f32>) {
    let m = f32(p.m);
    let mean = total.y;
    let invstd = inverseSqrt(total.z / m + p.eps);
    fstats[c] = vec4<f32>(mean, invstd, fweight[c] * invstd, fbias[c]);
    let k = p.momentum;
    frmean[c] = (1.0 - k) * frmean[c] + k * mean;
    frvar[c] = (1.0 - k) * frvar[c] + k * (total.z / (m - 1.0));
    if c == 0u {
        fcount[0] += 1u;
    }
}

// stats_finalize with one invocation per channel merging its blocks in turn: for a few blocks,
// cheaper than a workgroup's reduction (whose barriers dominate on software devices).
@compute @workgroup_size(64)
fn stats_finalize_seq(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.c {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var b = 0u; b < p.total_blocks; b++) {
        acc = merge(acc, fpart[c * p.total_blocks + b]);
    }
    finish_stats(c, acc);
}

@group(0) @binding(1) var<storage, read> rweight: array<f32>;
@group(0) @binding(2) var<storage, read> rbias: array<f32>;
@group(0) @binding(3) var<storage, read> rmean: array<f32>;
@group(0) @binding(4) var<storage, read> rvar: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstats: array<vec4<f32>>;

// Evaluation mode: the running statistics normalize.
@compute @workgroup_size(256)
fn stats_running(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = linear(gid, nw);
    if c >= p.c {
        return;
    }
    let invstd = inverseSqrt(rvar[c] + p.eps);
    rstats[c] = vec4<f32>(rmean[c], invstd, rweight[c] * invstd, rbias[c]);
}

@group(0) @binding(1) var<storage, read> nx: array<f32>;
@group(0) @binding(2) var<storage, read> nstats: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ny: array<f32>;

// y = (x - mean) * weight * invstd + bias, then max(y, 0) with RELU; one invocation per element.
@compute @workgroup_size(256)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.c * p.inner {
        return;
    }
    let s = nstats[(t / p.inner) % p.c];
    let y = (nx[t] - s.x) * s.z + s.w;
    ny[t] = select(y, max(y, 0.0), RELU);
}

@group(0) @binding(1) var<storage, read> nx4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ny4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn normalize4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.c * p.inner / 4u {
        return;
    }
    let s = nstats[(t / (p.inner / 4u)) % p.c];
    let y = (nx4[t] - s.x) * s.z + s.w;
    ny4[t] = select(y, max(y, vec4<f32>(0.0)), RELU);
}

// normalize4 over four vec4s of one channel per invocation (`inner` a multiple of 16): the
// channel's statistics are loaded once for 16 elements.
@compute @workgroup_size(256)
fn normalize16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    let inner16 = p.inner / 16u;
    if t >= p.outer * p.c * inner16 {
        return;
    }
    let s = nstats[(t / inner16) % p.c];
    let y0 = (nx4[4u * t] - s.x) * s.z + s.w;
    let y1 = (nx4[4u * t + 1u] - s.x) * s.z + s.w;
    let y2 = (nx4[4u * t + 2u] - s.x) * s.z + s.w;
    let y3 = (nx4[4u * t + 3u] - s.x) * s.z + s.w;
    let z = vec4<f32>(0.0);
    ny4[4u * t] = select(y0, max(y0, z), RELU);
    ny4[4u * t + 1u] = select(y1, max(y1, z), RELU);
    ny4[4u * t + 2u] = select(y2, max(y2, z), RELU);
    ny4[4u * t + 3u] = select(y3, max(y3, z), RELU);
}

@group(0) @binding(1) var<storage, read> gx: array<f32>;
@group(0) @binding(2) var<storage, read> gdy: array<f32>;
@group(0) @binding(3) var<storage, read> gstats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> gpart: array<vec4<f32>>;

// The gradient reaching the normalized value: dy, masked where the fused ReLU clipped.
fn dy_at(k: u32, s: vec4<f32>) -> f32 {
    let dy = gdy[k];
    if RELU {
        return select(0.0, dy, (gx[k] - s.x) * s.z + s.w > 0.0);
    }
    return dy;
}

// Workgroup (block, c): gpart[c * total_blocks + block0 + block] = (sum dy, sum dy * xhat, 0, 0).
@compute @workgroup_size(WG)
fn grad_partial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let s = gstats[c];
    let start = wid.x * p.block_len;
    let end = min(start + p.block_len, p.outer * p.inner);
    var acc = vec4<f32>(0.0);
    var w = walk_start(start + lid, p.inner);
    for (var j = start + lid; j < end; j += WG) {
        let k = (w.o * p.c + c) * p.inner + w.i;
        walk_step(&w, p.inner);
        let dy = dy_at(k, s);
        acc.x += dy;
        acc.y += dy * (gx[k] - s.x) * s.y;
    }
    let total = sum_workgroup(lid, acc);
    if lid == 0u {
        gpart[c * p.total_blocks + p.block0 + wid.x] = total;
    }
}

@group(0) @binding(1) var<storage, read> gx4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gdy4: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn grad_partial4(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let s = gstats[c];
    let start = wid.x * p.block_len / 4u;
    let end = min(start + p.block_len / 4u, p.outer * p.inner / 4u);
    var sdy = vec4<f32>(0.0);
    var sdx = vec4<f32>(0.0);
    let inner4 = p.inner / 4u;
    var w = walk_start(start + lid, inner4);
    for (var q = start + lid; q < end; q += WG) {
        let k = (w.o * p.c + c) * inner4 + w.i;
        walk_step(&w, inner4);
        let x = gx4[k];
        var dy = gdy4[k];
        if RELU {
            dy = select(vec4<f32>(0.0), dy, (x - s.x) * s.z + s.w > vec4<f32>(0.0));
        }
        sdy += dy;
        sdx += dy * (x - s.x) * s.y;
    }
    let one = vec4<f32>(1.0);
    let total = sum_workgroup(lid, vec4<f32>(dot(sdy, one), dot(sdx, one), 0.0, 0.0));
    if lid == 0u {
        gpart[c * p.total_blocks + p.block0 + wid.x] = total;
    }
}

// grad_partial4 over four vec4s of one sample a step (`inner` a multiple of 16).
@compute @workgroup_size(WG)
fn grad_partial16(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.y;
    let s = gstats[c];
    let start = wid.x * p.block_len / 16u;
    let end = min(start + p.block_len / 16u, p.outer * p.inner / 16u);
    var sdy = vec4<f32>(0.0);
    var sdx = vec4<f32>(0.0);
    let inner16 = p.inner / 16u;
    var w = walk_start(start + lid, inner16);
    for (var q = start + lid; q < end; q += WG) {
        let k = 4u * ((w.o * p.c + c) * inner16 + w.i);
        walk_step(&w, inner16);
        for (var r = 0u; r < 4u; r++) {
            let x = gx4[k + r];
            var dy = gdy4[k + r];
            if RELU {
                dy = select(vec4<f32>(0.0), dy, (x - s.x) * s.z + s.w > vec4<f32>(0.0));
            }
            sdy += dy;
            sdx += dy * (x - s.x) * s.y;
        }
    }
    let one = vec4<f32>(1.0);
    let total = sum_workgroup(lid, vec4<f32>(dot(sdy, one), dot(sdx, one), 0.0, 0.0));
    if lid == 0u {
        gpart[c * p.total_blocks + p.block0 + wid.x] = total;
    }
}

@group(0) @binding(1) var<storage, read> hpart: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> hweight: array<f32>;
@group(0) @binding(3) var<storage, read> hstats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> hcoef: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> hdweight: array<f32>;
@group(0) @binding(6) var<storage, read_write> hdbias: array<f32>;

// Workgroup c: dbias = sum dy, dweight = sum dy * xhat, and the coefficients of dx. Training mode
// (mean and invstd depend on x): dx = k * (dy - sum dy / M - xhat * sum(dy xhat) / M), k = w * invstd;
// evaluation mode: dx = k * dy.
@compute @workgroup_size(256)
fn grad_finalize(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x;
    var acc = vec4<f32>(0.0);
    for (var b = lid; b < p.total_blocks; b += WG) {
        acc += hpart[c * p.total_blocks + b];
    }
    let total = sum_workgroup(lid, acc);
    if lid == 0u {
        finish_grad(c, total);
    }
}

fn finish_grad(c: u32, total: vec4<f32>) {
    let s = hstats[c];
    let k = hweight[c] * s.y;
    let m = f32(p.m);
    hdbias[c] = total.x;
    hdweight[c] = total.y;
    if TRAIN {
        hcoef[c] = vec4<f32>(k, -k * s.y * total.y / m, -k * total.x / m, s.x);
    } else {
        hcoef[c] = vec4<f32>(k, 0.0, 0.0, s.x);
    }
}

// grad_finalize with one invocation per channel, as stats_finalize_seq.
@compute @workgroup_size(64)
fn grad_finalize_seq(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.c {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var b = 0u; b < p.total_blocks; b++) {
        acc += hpart[c * p.total_blocks + b];
    }
    finish_grad(c, acc);
}

@group(0) @binding(1) var<storage, read> ix: array<f32>;
@group(0) @binding(2) var<storage, read> idy: array<f32>;
@group(0) @binding(3) var<storage, read> icoef: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> istats: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> idx: array<f32>;

// dx = k * dy + a * (x - mean) + q per element (dy masked by the fused ReLU).
@compute @workgroup_size(256)
fn grad_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.c * p.inner {
        return;
    }
    let c = (t / p.inner) % p.c;
    let f = icoef[c];
    let x = ix[t];
    var dy = idy[t];
    if RELU {
        let s = istats[c];
        dy = select(0.0, dy, (x - s.x) * s.z + s.w > 0.0);
    }
    idx[t] = f.x * dy + f.y * (x - f.w) + f.z;
}

@group(0) @binding(1) var<storage, read> ix4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> idy4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> idx4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn grad_input4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.outer * p.c * p.inner / 4u {
        return;
    }
    let c = (t / (p.inner / 4u)) % p.c;
    let f = icoef[c];
    let x = ix4[t];
    var dy = idy4[t];
    if RELU {
        let s = istats[c];
        dy = select(vec4<f32>(0.0), dy, (x - s.x) * s.z + s.w > vec4<f32>(0.0));
    }
    idx4[t] = f.x * dy + f.y * (x - f.w) + f.z;
}

// grad_input4 over four vec4s of one channel per invocation (`inner` a multiple of 16).
@compute @workgroup_size(256)
fn grad_input16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    let inner16 = p.inner / 16u;
    if t >= p.outer * p.c * inner16 {
        return;
    }
    let c = (t / inner16) % p.c;
    let f = icoef[c];
    let s = istats[c];
    grad_input_at(4u * t, f, s);
    grad_input_at(4u * t + 1u, f, s);
    grad_input_at(4u * t + 2u, f, s);
    grad_input_at(4u * t + 3u, f, s);
}

fn grad_input_at(q: u32, f: vec4<f32>, s: vec4<f32>) {
    let x = ix4[q];
    var dy = idy4[q];
    if RELU {
        dy = select(vec4<f32>(0.0), dy, (x - s.x) * s.z + s.w > vec4<f32>(0.0));
    }
    idx4[q] = f.x * dy + f.y * (x - f.w) + f.z;
}

// BatchNorm1d over rows [M, C] with C a multiple of 4 up to 1024 (channels-last): a vec4 holds
// four channels of one row. The per-element kernels give each invocation ROWS rows of one channel
// group, so the four channels' statistics are loaded once.
const ROWS: u32 = 4u;

@group(0) @binding(1) var<storage, read> rx4: array<vec4<f32>>;

// Workgroup `block` reads rows [block * block_len, ..) whole: lane l takes channel group
// l % (C / 4) of rows l / (C / 4), + slots, + 2 slots, ... (slots = 256 / (C / 4) rows at a time,
// so that neighbouring lanes read neighbouring bytes); the first C / 4 lanes then merge the
// slots' partials, one channel of their group at a time.
fn rows_slots() -> u32 {
    return WG / (p.c / 4u);
}

@compute @workgroup_size(256)
fn stats_partial_rows4(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let groups = p.c / 4u;
    let slots = rows_slots();
    let cg = lid % groups;
    let start = wid.x * p.block_len;
    let end = min(start + p.block_len, p.outer);
    var n = 0.0;
    var mean = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    if lid < slots * groups {
        for (var r = start + lid / groups; r < end; r += slots) {
            let v = rx4[r * groups + cg];
            n += 1.0;
            let d = v - mean;
            mean += d / n;
            m2 += d * (v - mean);
        }
    }
    for (var j = 0u; j < 4u; j++) {
        sh[lid] = vec4<f32>(n, mean[j], m2[j], 0.0);
        workgroupBarrier();
        if lid < groups {
            var acc = sh[lid];
            for (var q = 1u; q < slots; q++) {
                acc = merge(acc, sh[q * groups + lid]);
            }
            spart[(4u * cg + j) * p.total_blocks + p.block0 + wid.x] = acc;
        }
        workgroupBarrier();
    }
}

// The statistics of channels 4 cg .. 4 cg + 3 by component: mean, invstd, scale, bias.
struct Stats4 {
    mean: vec4<f32>,
    invstd: vec4<f32>,
    scale: vec4<f32>,
    bias: vec4<f32>,
}

fn stats4(s0: vec4<f32>, s1: vec4<f32>, s2: vec4<f32>, s3: vec4<f32>) -> Stats4 {
    return Stats4(vec4<f32>(s0.x, s1.x, s2.x, s3.x), vec4<f32>(s0.y, s1.y, s2.y, s3.y),
        vec4<f32>(s0.z, s1.z, s2.z, s3.z), vec4<f32>(s0.w, s1.w, s2.w, s3.w));
}

@compute @workgroup_size(256)
fn normalize_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    let groups = p.c / 4u;
    let cg = t % groups;
    let r0 = (t / groups) * ROWS;
    if r0 >= p.outer {
        return;
    }
    let s = stats4(nstats[4u * cg], nstats[4u * cg + 1u], nstats[4u * cg + 2u], nstats[4u * cg + 3u]);
    for (var r = r0; r < min(r0 + ROWS, p.outer); r++) {
        let y = (nx4[r * groups + cg] - s.mean) * s.scale + s.bias;
        ny4[r * groups + cg] = select(y, max(y, vec4<f32>(0.0)), RELU);
    }
}

@compute @workgroup_size(256)
fn grad_partial_rows4(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let groups = p.c / 4u;
    let slots = rows_slots();
    let cg = lid % groups;
    let s = stats4(gstats[4u * cg], gstats[4u * cg + 1u], gstats[4u * cg + 2u], gstats[4u * cg + 3u]);
    let start = wid.x * p.block_len;
    let end = min(start + p.block_len, p.outer);
    var sdy = vec4<f32>(0.0);
    var sdx = vec4<f32>(0.0);
    if lid < slots * groups {
        for (var r = start + lid / groups; r < end; r += slots) {
            let x = gx4[r * groups + cg];
            var dy = gdy4[r * groups + cg];
            if RELU {
                dy = select(vec4<f32>(0.0), dy, (x - s.mean) * s.scale + s.bias > vec4<f32>(0.0));
            }
            sdy += dy;
            sdx += dy * (x - s.mean) * s.invstd;
        }
    }
    for (var j = 0u; j < 4u; j++) {
        sh[lid] = vec4<f32>(sdy[j], sdx[j], 0.0, 0.0);
        workgroupBarrier();
        if lid < groups {
            var acc = sh[lid];
            for (var q = 1u; q < slots; q++) {
                acc += sh[q * groups + lid];
            }
            gpart[(4u * cg + j) * p.total_blocks + p.block0 + wid.x] = acc;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn grad_input_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    let groups = p.c / 4u;
    let cg = t % groups;
    let r0 = (t / groups) * ROWS;
    if r0 >= p.outer {
        return;
    }
    // coef by component: k, a, q, mean.
    let f = stats4(icoef[4u * cg], icoef[4u * cg + 1u], icoef[4u * cg + 2u], icoef[4u * cg + 3u]);
    var s: Stats4;
    if RELU {
        s = stats4(istats[4u * cg], istats[4u * cg + 1u], istats[4u * cg + 2u], istats[4u * cg + 3u]);
    }
    for (var r = r0; r < min(r0 + ROWS, p.outer); r++) {
        let x = ix4[r * groups + cg];
        var dy = idy4[r * groups + cg];
        if RELU {
            dy = select(vec4<f32>(0.0), dy, (x - s.mean) * s.scale + s.bias > vec4<f32>(0.0));
        }
        idx4[r * groups + cg] = f.mean * dy + f.invstd * (x - f.bias) + f.scale;
    }
}

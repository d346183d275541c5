// Bitonic sort of (key, index) pairs into descending key order, ties by ascending index, which is
// the order a stable descending sort gives. One launch per (k, j) step; n is a power of two.

struct Params {
    n: u32,
    j: u32,
    k: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> keys: array<f32>;
@group(0) @binding(2) var<storage, read_write> idx: array<u32>;

// True when (ka, ia) belongs before (kb, ib).
fn before(ka: f32, ia: u32, kb: f32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

@compute @workgroup_size(256)
fn bitonic_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    let l = i ^ p.j;
    if i >= p.n || l <= i {
        return;
    }
    let ki = keys[i];
    let kl = keys[l];
    let ii = idx[i];
    let il = idx[l];
    // Blocks of size k alternate direction so that merges see bitonic sequences.
    let forward = (i & p.k) == 0u;
    let swap = select(before(ki, ii, kl, il), before(kl, il, ki, ii), forward);
    if swap {
        keys[i] = kl;
        keys[l] = ki;
        idx[i] = il;
        idx[l] = ii;
    }
}

@group(0) @binding(1) var<storage, read> src_keys: array<f32>;
@group(0) @binding(2) var<storage, read_write> pad_keys: array<f32>;
@group(0) @binding(3) var<storage, read_write> pad_idx: array<u32>;

// Copies the m real keys and pads to n with entries that sort last.
@compute @workgroup_size(256)
fn init_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    if i >= p.n {
        return;
    }
    let m = p.j;
    if i < m {
        pad_keys[i] = src_keys[i];
    } else {
        pad_keys[i] = -3.4e38;
    }
    pad_idx[i] = i;
}

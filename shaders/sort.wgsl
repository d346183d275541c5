// Bitonic sort of (key, index) pairs into descending key order, ties by ascending index, which is
// the order a stable descending sort gives. One launch per (k, j) step; n is a power of two.
// Pairs are bound as two windows, so that arrays over one storage binding sort too: the lower
// elements of the launch's pairs from element `lo` on, their partners from element `hi` on (the
// same window, lo = hi, when a window holds whole pairs).

struct Params {
    n: u32,
    j: u32,
    k: u32,
    lo: u32,
    hi: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> keys_lo: array<f32>;
@group(0) @binding(2) var<storage, read_write> idx_lo: array<u32>;
@group(0) @binding(3) var<storage, read_write> keys_hi: array<f32>;
@group(0) @binding(4) var<storage, read_write> idx_hi: array<u32>;

// True when (ka, ia) belongs before (kb, ib).
fn before(ka: f32, ia: u32, kb: f32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

// Invocation t is element i = lo + t, paired with i + j when bit j of i is clear.
@compute @workgroup_size(256)
fn bitonic_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    let i = p.lo + t;
    if t >= p.n || (i & p.j) != 0u {
        return;
    }
    let l = i + p.j - p.hi;
    let ki = keys_lo[t];
    let kl = keys_hi[l];
    let ii = idx_lo[t];
    let il = idx_hi[l];
    // Blocks of size k alternate direction so that merges see bitonic sequences.
    let forward = (i & p.k) == 0u;
    let swap = select(before(ki, ii, kl, il), before(kl, il, ki, ii), forward);
    if swap {
        keys_lo[t] = kl;
        keys_hi[l] = ki;
        idx_lo[t] = il;
        idx_hi[l] = ii;
    }
}

@group(0) @binding(1) var<storage, read> src_keys: array<f32>;
@group(0) @binding(2) var<storage, read_write> pad_keys: array<f32>;
@group(0) @binding(3) var<storage, read_write> pad_idx: array<u32>;

// Elements lo + t of the padded pairs: the m = j real keys (src_keys bound from element lo), then
// entries that sort last.
@compute @workgroup_size(256)
fn init_pairs(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    if t >= p.n {
        return;
    }
    let i = p.lo + t;
    if i < p.j {
        pad_keys[t] = src_keys[t];
    } else {
        pad_keys[t] = -3.4e38;
    }
    pad_idx[t] = i;
}

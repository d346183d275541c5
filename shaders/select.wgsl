// The k largest keys without sorting them. The k-th largest key is found a byte at a time from
// the top: a histogram of the byte under `shift` over the keys that share the bytes found so far,
// then the bin that holds the k-th of them. The keys above it, and the first of those equal to
// it (by position), are then flagged.
//
// state: [0] the bytes found so far, in place; [1] the mask of the bits found; [2] how many of
// the keys that match the found bits are still to be taken.

struct Params {
    // Entries in this launch's window.
    n: u32,
    shift: u32,
    // Of them, keys (the flags cover a padded range: zero past the keys).
    valid: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Keys as u32 that order as the floats do: a clear sign bit is set, a set one flips every bit.
fn ordered(k: f32) -> u32 {
    let b = bitcast<u32>(k);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

const PER_LANE: u32 = 16u;

@group(0) @binding(1) var<storage, read> keys: array<f32>;
@group(0) @binding(2) var<storage, read_write> hist: array<atomic<u32>, 256>;
@group(0) @binding(3) var<storage, read> state: array<u32>;

var<workgroup> local_hist: array<atomic<u32>, 256>;

// Each workgroup counts PER_LANE * 256 keys into its own bins, then adds them to the global ones.
@compute @workgroup_size(256)
fn histogram(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(num_workgroups) nw: vec3<u32>,
) {
    atomicStore(&local_hist[li], 0u);
    workgroupBarrier();
    let base = (wid.x + wid.y * nw.x) * 256u * PER_LANE;
    let found = state[0];
    let mask = state[1];
    for (var j = 0u; j < PER_LANE; j++) {
        let t = base + j * 256u + li;
        if t < p.n {
            let u = ordered(keys[t]);
            if (u & mask) == found {
                atomicAdd(&local_hist[(u >> p.shift) & 255u], 1u);
            }
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&local_hist[li]);
    if c != 0u {
        atomicAdd(&hist[li], c);
    }
}

@group(0) @binding(1) var<storage, read_write> bins: array<u32, 256>;
@group(0) @binding(2) var<storage, read_write> state_rw: array<u32>;

// The bin, from the top, in which the keys still to be taken run out; clears the bins for the
// next byte.
@compute @workgroup_size(1)
fn pick() {
    var need = state_rw[2];
    var b = 255u;
    loop {
        let c = bins[b];
        if c >= need || b == 0u {
            break;
        }
        need -= c;
        b -= 1u;
    }
    state_rw[0] |= b << p.shift;
    state_rw[1] |= 255u << p.shift;
    state_rw[2] = need;
    for (var i = 0u; i < 256u; i++) {
        bins[i] = 0u;
    }
}

@group(0) @binding(2) var<storage, read_write> flags: array<f32>;

// 1 where the key equals the k-th largest (ties to be ranked by position), else 0.
@compute @workgroup_size(256)
fn ties(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    if t >= p.n {
        return;
    }
    flags[t] = select(0.0, 1.0, t < p.valid && ordered(keys[min(t, max(p.valid, 1u) - 1u)]) == state[0]);
}

@group(0) @binding(4) var<storage, read> tie_rank: array<u32>;

// 1 for the keys taken: those above the k-th largest, and the first state[2] of those equal to it.
@compute @workgroup_size(256)
fn taken(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    if t >= p.n {
        return;
    }
    let u = ordered(keys[min(t, max(p.valid, 1u) - 1u)]);
    let kth = state[0];
    flags[t] = select(0.0, 1.0, t < p.valid && (u > kth || (u == kth && tie_rank[t] < state[2])));
}

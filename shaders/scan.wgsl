// Stream compaction: exclusive prefix sums in blocks of 256 x PER values (PER consecutive values
// per invocation), block totals scanned recursively, then the positions of the nonzero entries
// written in order. Each invocation sums its values in registers, so that the workgroup scan
// (workgroup-memory traffic and barriers, dear on CPU devices) is paid once per PER values.

// n = elements of this launch. compact only: `base` = global index of its first element, the
// output window [w0, w0 + wlen) it may write, and `last` when it writes the count.
struct Params {
    n: u32,
    base: u32,
    w0: u32,
    wlen: u32,
    last: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// At most MAX_PER (the size of the per-invocation arrays).
override PER: u32 = 16u;
const MAX_PER: u32 = 16u;
override BLOCK: u32 = 256u * PER;

var<workgroup> partial: array<u32, 256>;

fn block_id(wid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return wid.x + wid.y * nw.x;
}

// Exclusive scan of one value per invocation across the workgroup (Hillis-Steele).
fn workgroup_exclusive(t: u32, v: u32) -> u32 {
    partial[t] = v;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off *= 2u) {
        var add = 0u;
        if t >= off {
            add = partial[t - off];
        }
        workgroupBarrier();
        partial[t] += add;
        workgroupBarrier();
    }
    return partial[t] - v;
}

@group(0) @binding(1) var<storage, read> flags_in: array<f32>;
@group(0) @binding(1) var<storage, read> values_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> pos: array<u32>;
@group(0) @binding(3) var<storage, read_write> sums: array<u32>;

// Writes the exclusive prefix of the block's values (PER per invocation) and the block total.
fn scan_block(t: u32, b: u32, v: array<u32, MAX_PER>) {
    let base = b * BLOCK + t * PER;
    var total = 0u;
    for (var i = 0u; i < PER; i++) {
        total += v[i];
    }
    var run = workgroup_exclusive(t, total);
    for (var i = 0u; i < PER; i++) {
        if base + i < p.n {
            pos[base + i] = run;
        }
        run += v[i];
    }
    if t == 255u {
        sums[b] = run;
    }
}

// Prefix sums of nonzero flags.
@compute @workgroup_size(256)
fn scan_flags(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>) {
    let b = block_id(wid, nw);
    var v: array<u32, MAX_PER>;
    for (var i = 0u; i < PER; i++) {
        let e = b * BLOCK + t * PER + i;
        v[i] = select(0u, 1u, e < p.n && flags_in[min(e, p.n - 1u)] != 0.0);
    }
    scan_block(t, b, v);
}

// Prefix sums of u32 values (the block totals of a level below).
@compute @workgroup_size(256)
fn scan_u32(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>) {
    let b = block_id(wid, nw);
    var v: array<u32, MAX_PER>;
    for (var i = 0u; i < PER; i++) {
        let e = b * BLOCK + t * PER + i;
        v[i] = select(0u, values_in[min(e, p.n - 1u)], e < p.n);
    }
    scan_block(t, b, v);
}

@group(0) @binding(1) var<storage, read> block_offsets: array<u32>;
@group(0) @binding(2) var<storage, read_write> apos: array<u32>;

@compute @workgroup_size(256)
fn add_offsets(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    if i >= p.n {
        return;
    }
    apos[i] += block_offsets[i / BLOCK];
}

@group(0) @binding(1) var<storage, read> cflags: array<f32>;
@group(0) @binding(2) var<storage, read> cpos: array<u32>;
@group(0) @binding(3) var<storage, read_write> cout: array<u32>;
@group(0) @binding(4) var<storage, read_write> ccount: array<u32>;

@compute @workgroup_size(256)
fn compact(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    if i >= p.n {
        return;
    }
    let on = cflags[i] != 0.0;
    let d = cpos[i] - p.w0;
    if on && d < p.wlen {
        cout[d] = p.base + i;
    }
    if p.last != 0u && i == p.n - 1u {
        ccount[0] = cpos[i] + select(0u, 1u, on);
    }
}

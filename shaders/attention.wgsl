// Fused multi-head self-attention (the flash-attention scheme) over packed projections.
//
// qkv [S, L, 3d]: S sequences of L tokens; token (s, l) holds q | k | v, each d = H * Dh wide,
// head h in columns h*Dh..(h+1)*Dh of each part. out [S, L, d] holds the heads side by side (the
// layout the out-projection reads). lse and delta are [S*H, L]. Feature rows are read as vec4,
// so d and Dh are multiples of 4.
//
// GROUP consecutive invocations serve one (sequence, head) and 4 * GROUP rows of it (a block;
// long sequences have several); each invocation holds 4 rows (row0 + r * GROUP, r < 4) in
// registers, transposed so that the four rows are the lanes of a vec4: qt[k] = (q[row 0][k], ..,
// q[row 3][k]). Every vector loaded from the other side (keys in forward and backward_q, queries
// in backward_kv) then serves the four rows in vec4 arithmetic; storage loads are what a software
// device pays most for, and the streamed addresses are the same for the GROUP invocations (a
// broadcast on a GPU). Short sequences (the inter-sample attention has 4 tokens) have GROUP = 1:
// a workgroup then serves 64 of them. The L x L scores are never
// stored: the forward keeps the running max and sum per row (online softmax over blocks of BK
// keys) and saves logsumexp; the backward recomputes each probability as exp(score - lse).
//
// Dropout on the probabilities (PyTorch: out = dropout(softmax(scores)) @ v) keeps entry
// (bh, row, col) when hash(seed, bh, row, col) >= threshold and scales it by 1 / (1 - p); the
// hash is counter-based, so the backward and the composed reference regenerate the same mask.

struct Params {
    seqs: u32,
    len: u32,
    heads: u32,
    // d / 4: vec4 entries per part of a token
    d4: u32,
    scale: f32,
    threshold: u32,
    keep_scale: f32,
    seed_lo: u32,
    seed_hi: u32,
    // ceil(len / (4 * GROUP)): blocks per (sequence, head)
    blocks: u32,
    // The other side's tokens (keys in forward and backward_q, queries in backward_kv) are
    // split into `splits` ranges of `span`, each summed by its own invocations into its own
    // partial result (a GPU needs the parallelism; a software device has splits = 1).
    splits: u32,
    span: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Invocations per (sequence, head, block), block of the streamed rows, Dh / 4. The register arrays hold Dh
// entries of four rows each (sized for Dh = 32) and are only indexed by expressions that become
// constants once the loops over c < D4 are unrolled: an index that stays dynamic (a nested loop
// over rows, a vector component picked by a loop counter) sends the whole array to scratch
// memory, several times slower on a software device.
override GROUP: u32 = 64u;
override BK: u32 = 8u;
override D4: u32 = 8u;
override DROPOUT: bool = false;
// backward_kv computes dK (true) or dV (false): one launch each keeps fewer registers live.
override DK: bool = false;
const MAX_BK: u32 = 8u;
const MAX_DH: u32 = 32u;
const NEG: f32 = -3.0e38;

// lowbias32 (a bijective 32-bit mixer), offset so that 0 is not a fixed point.
fn mix32(v: vec4<u32>) -> vec4<u32> {
    var x = v + 0x9e3779b9u;
    x ^= x >> vec4<u32>(16u);
    x *= 0x7feb352du;
    x ^= x >> vec4<u32>(15u);
    x *= 0x846ca68bu;
    x ^= x >> vec4<u32>(16u);
    return x;
}

fn row_key(bh: u32, rows: vec4<u32>) -> vec4<u32> {
    let sh = mix32(mix32(vec4<u32>(p.seed_lo) ^ mix32(vec4<u32>(p.seed_hi))) ^ vec4<u32>(bh));
    return mix32(sh ^ rows);
}

// The kept probabilities' factors: 0 or 1 / (1 - p); `col_key` = mix32(col).
fn keep_factor(rk: vec4<u32>, col_key: vec4<u32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), vec4<f32>(p.keep_scale), mix32(rk ^ col_key) >= vec4<u32>(p.threshold));
}

// The invocation's sequence * H + head, its four rows (unclamped) and its split: the range
// [lo, hi) of the other side's tokens it sums over; `valid` is false for the invocations past the
// last block.
struct Tile {
    bh: u32,
    h: u32,
    s: u32,
    rows: vec4<u32>,
    split: u32,
    lo: u32,
    hi: u32,
    valid: bool,
}

fn tile(wid: vec3<u32>, nw: vec3<u32>, li: u32) -> Tile {
    let t = (wid.x + wid.y * nw.x) * 64u + li;
    let per_split = p.seqs * p.heads * p.blocks;
    let split = t / GROUP / per_split;
    let unit = t / GROUP % per_split;
    let bh = unit / p.blocks;
    let row0 = (unit % p.blocks) * 4u * GROUP + t % GROUP;
    let rows = vec4<u32>(row0, row0 + GROUP, row0 + 2u * GROUP, row0 + 3u * GROUP);
    let lo = split * p.span;
    let hi = min(p.len, lo + p.span);
    return Tile(bh, bh % p.heads, bh / p.heads, rows, split, lo, hi, split < p.splits);
}

// Rows past the end repeat the last row and are not stored.
fn clamped(rows: vec4<u32>) -> vec4<u32> {
    return min(rows, vec4<u32>(p.len - 1u));
}

@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64)
fn forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tl = tile(wid, nw, li);
    if !tl.valid {
        return;
    }
    let stride = 3u * p.d4;
    let qb = tl.s * p.len * stride + tl.h * D4;
    let kb = qb + p.d4;
    let vb = qb + 2u * p.d4;
    let rows = clamped(tl.rows);

    // qt[k] = (q[row r][k] * scale) over the four rows r; acc likewise.
    var qt: array<vec4<f32>, MAX_DH>;
    var acc: array<vec4<f32>, MAX_DH>;
    for (var c = 0u; c < D4; c++) {
        let a = qkv[qb + rows.x * stride + c] * p.scale;
        let b = qkv[qb + rows.y * stride + c] * p.scale;
        let e = qkv[qb + rows.z * stride + c] * p.scale;
        let f = qkv[qb + rows.w * stride + c] * p.scale;
        qt[4u * c] = vec4<f32>(a.x, b.x, e.x, f.x);
        qt[4u * c + 1u] = vec4<f32>(a.y, b.y, e.y, f.y);
        qt[4u * c + 2u] = vec4<f32>(a.z, b.z, e.z, f.z);
        qt[4u * c + 3u] = vec4<f32>(a.w, b.w, e.w, f.w);
        acc[4u * c] = vec4<f32>(0.0);
        acc[4u * c + 1u] = vec4<f32>(0.0);
        acc[4u * c + 2u] = vec4<f32>(0.0);
        acc[4u * c + 3u] = vec4<f32>(0.0);
    }
    var m = vec4<f32>(NEG);
    var l = vec4<f32>(0.0);
    var rk = vec4<u32>(0u);
    if DROPOUT {
        rk = row_key(tl.bh, tl.rows);
    }

    var sc: array<vec4<f32>, MAX_BK>;
    for (var j0 = tl.lo; j0 < tl.hi; j0 += BK) {
        // Scores of the block; keys past the end score NEG, which exp turns into 0.
        var mx = m;
        for (var jj = 0u; jj < BK; jj++) {
            let j = min(j0 + jj, tl.hi - 1u);
            var s4 = vec4<f32>(0.0);
            for (var c = 0u; c < D4; c++) {
                let k = qkv[kb + j * stride + c];
                s4 += qt[4u * c] * k.x + qt[4u * c + 1u] * k.y + qt[4u * c + 2u] * k.z + qt[4u * c + 3u] * k.w;
            }
            sc[jj] = select(vec4<f32>(NEG), s4, j0 + jj < tl.hi);
            mx = max(mx, sc[jj]);
        }
        // Online softmax: rescale what was accumulated to the new running max.
        let corr = exp(m - mx);
        l *= corr;
        for (var k = 0u; k < 4u * D4; k++) {
            acc[k] *= corr;
        }
        m = mx;
        for (var jj = 0u; jj < BK; jj++) {
            let j = min(j0 + jj, tl.hi - 1u);
            var e = exp(sc[jj] - mx);
            l += e;
            if DROPOUT {
                e *= keep_factor(rk, mix32(vec4<u32>(j0 + jj)));
            }
            for (var c = 0u; c < D4; c++) {
                let v = qkv[vb + j * stride + c];
                acc[4u * c] += e * v.x;
                acc[4u * c + 1u] += e * v.y;
                acc[4u * c + 2u] += e * v.z;
                acc[4u * c + 3u] += e * v.w;
            }
        }
    }

    let inv = 1.0 / l;
    let lse4 = m + log(l);
    let ok = tl.rows < vec4<u32>(p.len);
    // Split s writes the s-th [S, L, d] slice of `out` and [S*H, L] slice of `lse`.
    let ob = (tl.split * p.seqs + tl.s) * p.len * p.d4 + tl.h * D4;
    for (var c = 0u; c < D4; c++) {
        let t = transpose(mat4x4<f32>(acc[4u * c], acc[4u * c + 1u], acc[4u * c + 2u], acc[4u * c + 3u]));
        if ok.x {
            out[ob + rows.x * p.d4 + c] = t[0] * inv.x;
        }
        if ok.y {
            out[ob + rows.y * p.d4 + c] = t[1] * inv.y;
        }
        if ok.z {
            out[ob + rows.z * p.d4 + c] = t[2] * inv.z;
        }
        if ok.w {
            out[ob + rows.w * p.d4 + c] = t[3] * inv.w;
        }
    }
    let lb = (tl.split * p.seqs * p.heads + tl.bh) * p.len;
    if ok.x {
        lse[lb + rows.x] = lse4.x;
    }
    if ok.y {
        lse[lb + rows.y] = lse4.y;
    }
    if ok.z {
        lse[lb + rows.z] = lse4.z;
    }
    if ok.w {
        lse[lb + rows.w] = lse4.w;
    }
}

// The forward's splits merged, one invocation per (sequence * H + head, row): split s summed
// keys [s * span, (s + 1) * span) into its normalized output o_s and logsumexp lse_s; the whole
// is lse = log sum_s exp(lse_s) and out = sum_s exp(lse_s - lse) o_s.
@group(0) @binding(1) var<storage, read> cb_out: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cb_lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> cb_merged: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> cb_merged_lse: array<f32>;

@compute @workgroup_size(64)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 64u;
    let entries = p.seqs * p.heads * p.len;
    if t >= entries {
        return;
    }
    let row = t % p.len;
    let bh = t / p.len;
    let base = ((bh / p.heads) * p.len + row) * p.d4 + (bh % p.heads) * D4;
    let slice = p.seqs * p.len * p.d4;
    var m = NEG;
    for (var s = 0u; s < p.splits; s++) {
        m = max(m, cb_lse[s * entries + t]);
    }
    var z = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        z += exp(cb_lse[s * entries + t] - m);
    }
    for (var c = 0u; c < D4; c++) {
        var acc = vec4<f32>(0.0);
        for (var s = 0u; s < p.splits; s++) {
            acc += exp(cb_lse[s * entries + t] - m) / z * cb_out[s * slice + base + c];
        }
        cb_merged[base + c] = acc;
    }
    cb_merged_lse[t] = m + log(z);
}

// delta [S*H, L]: delta_i = dO_i . O_i per head, one invocation per entry.
@group(0) @binding(1) var<storage, read> dl_out: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dl_dout: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dl_delta: array<f32>;

@compute @workgroup_size(64)
fn delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 64u;
    if t >= p.seqs * p.heads * p.len {
        return;
    }
    let row = t % p.len;
    let bh = t / p.len;
    let base = ((bh / p.heads) * p.len + row) * p.d4 + (bh % p.heads) * D4;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < D4; c++) {
        acc += dl_out[base + c] * dl_dout[base + c];
    }
    dl_delta[t] = acc.x + acc.y + acc.z + acc.w;
}

// Backward, query side: for every key j, P = exp(q_i . k_j * scale - lse_i),
// dP = (dO_i . v_j) * keep, dS = P (dP - delta_i), dQ_i = scale * sum_j dS k_j. Writes the q part
// of dqkv.
@group(0) @binding(1) var<storage, read> bq_qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bq_dout: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bq_lse: array<f32>;
@group(0) @binding(4) var<storage, read> bq_delta: array<f32>;
@group(0) @binding(5) var<storage, read_write> bq_dqkv: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_q(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tl = tile(wid, nw, li);
    if !tl.valid {
        return;
    }
    let stride = 3u * p.d4;
    let qb = tl.s * p.len * stride + tl.h * D4;
    let kb = qb + p.d4;
    let vb = qb + 2u * p.d4;
    let ob = tl.s * p.len * p.d4 + tl.h * D4;
    let rows = clamped(tl.rows);

    // Transposed as in forward: qt (scaled), gt = dO, dqt = dQ / scale.
    var qt: array<vec4<f32>, MAX_DH>;
    var gt: array<vec4<f32>, MAX_DH>;
    var dqt: array<vec4<f32>, MAX_DH>;
    for (var c = 0u; c < D4; c++) {
        let q0 = bq_qkv[qb + rows.x * stride + c] * p.scale;
        let q1 = bq_qkv[qb + rows.y * stride + c] * p.scale;
        let q2 = bq_qkv[qb + rows.z * stride + c] * p.scale;
        let q3 = bq_qkv[qb + rows.w * stride + c] * p.scale;
        let g0 = bq_dout[ob + rows.x * p.d4 + c];
        let g1 = bq_dout[ob + rows.y * p.d4 + c];
        let g2 = bq_dout[ob + rows.z * p.d4 + c];
        let g3 = bq_dout[ob + rows.w * p.d4 + c];
        qt[4u * c] = vec4<f32>(q0.x, q1.x, q2.x, q3.x);
        qt[4u * c + 1u] = vec4<f32>(q0.y, q1.y, q2.y, q3.y);
        qt[4u * c + 2u] = vec4<f32>(q0.z, q1.z, q2.z, q3.z);
        qt[4u * c + 3u] = vec4<f32>(q0.w, q1.w, q2.w, q3.w);
        gt[4u * c] = vec4<f32>(g0.x, g1.x, g2.x, g3.x);
        gt[4u * c + 1u] = vec4<f32>(g0.y, g1.y, g2.y, g3.y);
        gt[4u * c + 2u] = vec4<f32>(g0.z, g1.z, g2.z, g3.z);
        gt[4u * c + 3u] = vec4<f32>(g0.w, g1.w, g2.w, g3.w);
        dqt[4u * c] = vec4<f32>(0.0);
        dqt[4u * c + 1u] = vec4<f32>(0.0);
        dqt[4u * c + 2u] = vec4<f32>(0.0);
        dqt[4u * c + 3u] = vec4<f32>(0.0);
    }
    let lb = tl.bh * p.len;
    let lse4 = vec4<f32>(bq_lse[lb + rows.x], bq_lse[lb + rows.y], bq_lse[lb + rows.z], bq_lse[lb + rows.w]);
    let delta = vec4<f32>(bq_delta[lb + rows.x], bq_delta[lb + rows.y], bq_delta[lb + rows.z], bq_delta[lb + rows.w]);
    var rk = vec4<u32>(0u);
    if DROPOUT {
        rk = row_key(tl.bh, tl.rows);
    }

    // Blocks of BK keys: dS of the block first, then dQ += dS k reloading the keys, so that
    // few values stay live across iterations of the outer loop.
    var ds: array<vec4<f32>, MAX_BK>;
    for (var j0 = tl.lo; j0 < tl.hi; j0 += BK) {
        for (var jj = 0u; jj < BK; jj++) {
            let j = min(j0 + jj, tl.hi - 1u);
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c = 0u; c < D4; c++) {
                let k = bq_qkv[kb + j * stride + c];
                let v = bq_qkv[vb + j * stride + c];
                s4 += qt[4u * c] * k.x + qt[4u * c + 1u] * k.y + qt[4u * c + 2u] * k.z + qt[4u * c + 3u] * k.w;
                g4 += gt[4u * c] * v.x + gt[4u * c + 1u] * v.y + gt[4u * c + 2u] * v.z + gt[4u * c + 3u] * v.w;
            }
            if DROPOUT {
                g4 *= keep_factor(rk, mix32(vec4<u32>(j0 + jj)));
            }
            ds[jj] = select(vec4<f32>(0.0), exp(s4 - lse4) * (g4 - delta), j0 + jj < tl.hi);
        }
        for (var jj = 0u; jj < BK; jj++) {
            let j = min(j0 + jj, tl.hi - 1u);
            for (var c = 0u; c < D4; c++) {
                let k = bq_qkv[kb + j * stride + c];
                dqt[4u * c] += ds[jj] * k.x;
                dqt[4u * c + 1u] += ds[jj] * k.y;
                dqt[4u * c + 2u] += ds[jj] * k.z;
                dqt[4u * c + 3u] += ds[jj] * k.w;
            }
        }
    }

    let ok = tl.rows < vec4<u32>(p.len);
    // Split s writes the s-th [S, L, 3d] slice of dqkv.
    let db = qb + tl.split * p.seqs * p.len * stride;
    for (var c = 0u; c < D4; c++) {
        let t = transpose(mat4x4<f32>(dqt[4u * c], dqt[4u * c + 1u], dqt[4u * c + 2u], dqt[4u * c + 3u]));
        if ok.x {
            bq_dqkv[db + rows.x * stride + c] = t[0] * p.scale;
        }
        if ok.y {
            bq_dqkv[db + rows.y * stride + c] = t[1] * p.scale;
        }
        if ok.z {
            bq_dqkv[db + rows.z * stride + c] = t[2] * p.scale;
        }
        if ok.w {
            bq_dqkv[db + rows.w * stride + c] = t[3] * p.scale;
        }
    }
}

// Backward, key side: four key rows per invocation (transposed likewise); for every query i, with
// P and dS as in backward_q, dV_j = sum_i P keep dO_i, dK_j = scale * sum_i dS q_i. Writes the k
// and v parts of dqkv.
@group(0) @binding(1) var<storage, read> bk_qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bk_dout: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bk_lse: array<f32>;
@group(0) @binding(4) var<storage, read> bk_delta: array<f32>;
@group(0) @binding(5) var<storage, read_write> bk_dqkv: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_kv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tl = tile(wid, nw, li);
    if !tl.valid {
        return;
    }
    let stride = 3u * p.d4;
    let qb = tl.s * p.len * stride + tl.h * D4;
    let kb = qb + p.d4;
    let vb = qb + 2u * p.d4;
    let ob = tl.s * p.len * p.d4 + tl.h * D4;
    let cols = clamped(tl.rows);

    // kt is scaled on load, so that q . k is the score; dK = scale * sum dS q is scaled on store.
    var kt: array<vec4<f32>, MAX_DH>;
    var vt: array<vec4<f32>, MAX_DH>;
    // dK / scale with DK, else dV
    var dt: array<vec4<f32>, MAX_DH>;
    for (var c = 0u; c < D4; c++) {
        let k0 = bk_qkv[kb + cols.x * stride + c] * p.scale;
        let k1 = bk_qkv[kb + cols.y * stride + c] * p.scale;
        let k2 = bk_qkv[kb + cols.z * stride + c] * p.scale;
        let k3 = bk_qkv[kb + cols.w * stride + c] * p.scale;
        kt[4u * c] = vec4<f32>(k0.x, k1.x, k2.x, k3.x);
        kt[4u * c + 1u] = vec4<f32>(k0.y, k1.y, k2.y, k3.y);
        kt[4u * c + 2u] = vec4<f32>(k0.z, k1.z, k2.z, k3.z);
        kt[4u * c + 3u] = vec4<f32>(k0.w, k1.w, k2.w, k3.w);
        if DK {
            let v0 = bk_qkv[vb + cols.x * stride + c];
            let v1 = bk_qkv[vb + cols.y * stride + c];
            let v2 = bk_qkv[vb + cols.z * stride + c];
            let v3 = bk_qkv[vb + cols.w * stride + c];
            vt[4u * c] = vec4<f32>(v0.x, v1.x, v2.x, v3.x);
            vt[4u * c + 1u] = vec4<f32>(v0.y, v1.y, v2.y, v3.y);
            vt[4u * c + 2u] = vec4<f32>(v0.z, v1.z, v2.z, v3.z);
            vt[4u * c + 3u] = vec4<f32>(v0.w, v1.w, v2.w, v3.w);
        }
        dt[4u * c] = vec4<f32>(0.0);
        dt[4u * c + 1u] = vec4<f32>(0.0);
        dt[4u * c + 2u] = vec4<f32>(0.0);
        dt[4u * c + 3u] = vec4<f32>(0.0);
    }
    var ck = vec4<u32>(0u);
    if DROPOUT {
        ck = mix32(tl.rows);
    }

    // Blocks of BK queries: the block's weights w (dS with DK, else P * keep) first, then
    // dt += w q (DK) or w dO, reloading the queries.
    var w: array<vec4<f32>, MAX_BK>;
    for (var i0 = tl.lo; i0 < tl.hi; i0 += BK) {
        for (var ii = 0u; ii < BK; ii++) {
            let i = min(i0 + ii, tl.hi - 1u);
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c = 0u; c < D4; c++) {
                let q = bk_qkv[qb + i * stride + c];
                s4 += kt[4u * c] * q.x + kt[4u * c + 1u] * q.y + kt[4u * c + 2u] * q.z + kt[4u * c + 3u] * q.w;
                if DK {
                    let g = bk_dout[ob + i * p.d4 + c];
                    g4 += vt[4u * c] * g.x + vt[4u * c + 1u] * g.y + vt[4u * c + 2u] * g.z + vt[4u * c + 3u] * g.w;
                }
            }
            let pr = exp(s4 - bk_lse[tl.bh * p.len + i]);
            var keep = vec4<f32>(1.0);
            if DROPOUT {
                keep = keep_factor(row_key(tl.bh, vec4<u32>(i0 + ii)), ck);
            }
            var wi = pr * keep;
            if DK {
                wi = pr * (g4 * keep - bk_delta[tl.bh * p.len + i]);
            }
            w[ii] = select(vec4<f32>(0.0), wi, i0 + ii < tl.hi);
        }
        for (var ii = 0u; ii < BK; ii++) {
            let i = min(i0 + ii, tl.hi - 1u);
            for (var c = 0u; c < D4; c++) {
                var x: vec4<f32>;
                if DK {
                    x = bk_qkv[qb + i * stride + c];
                } else {
                    x = bk_dout[ob + i * p.d4 + c];
                }
                dt[4u * c] += w[ii] * x.x;
                dt[4u * c + 1u] += w[ii] * x.y;
                dt[4u * c + 2u] += w[ii] * x.z;
                dt[4u * c + 3u] += w[ii] * x.w;
            }
        }
    }

    let base = select(vb, kb, DK) + tl.split * p.seqs * p.len * stride;
    let scale = select(1.0, p.scale, DK);
    let ok = tl.rows < vec4<u32>(p.len);
    for (var c = 0u; c < D4; c++) {
        let t = transpose(mat4x4<f32>(dt[4u * c], dt[4u * c + 1u], dt[4u * c + 2u], dt[4u * c + 3u]));
        if ok.x {
            bk_dqkv[base + cols.x * stride + c] = t[0] * scale;
        }
        if ok.y {
            bk_dqkv[base + cols.y * stride + c] = t[1] * scale;
        }
        if ok.z {
            bk_dqkv[base + cols.z * stride + c] = t[2] * scale;
        }
        if ok.w {
            bk_dqkv[base + cols.w * stride + c] = t[3] * scale;
        }
    }
}

// The dropout factors themselves, [B, R, C] with entry (b, r, c) = keep_factor of (seed, b, r, c):
// the mask the fused kernels apply to the probabilities of (b = sequence * H + head, row, col),
// and the elementwise dropout of a [R, C] activation (B = 1).
struct MaskParams {
    b: u32,
    r: u32,
    c: u32,
    threshold: u32,
    keep_scale: f32,
    seed_lo: u32,
    seed_hi: u32,
}

@group(0) @binding(0) var<uniform> mp: MaskParams;
@group(0) @binding(1) var<storage, read_write> mask: array<f32>;

fn mix1(v: u32) -> u32 {
    return mix32(vec4<u32>(v)).x;
}

@compute @workgroup_size(256)
fn dropout_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    if i >= mp.b * mp.r * mp.c {
        return;
    }
    let col = i % mp.c;
    let row = (i / mp.c) % mp.r;
    let b = i / (mp.c * mp.r);
    let rk = mix1(mix1(mix1(mp.seed_lo ^ mix1(mp.seed_hi)) ^ b) ^ row);
    mask[i] = select(0.0, mp.keep_scale, mix1(rk ^ mix1(col)) >= mp.threshold);
}

// Batched matrix product C[b] = op(A[b]) op(B[b]), op = optional transpose (TA, TB).
// Each invocation computes a 4 x 4 block of C held in registers; a 16 x 16 workgroup covers a
// 64 x 64 tile. Batch strides of 0 broadcast an operand over the batch. A launch may cover a
// block of a larger product: leading dimensions (lda, ldb, ldc) and offsets locate it in the
// windows the operands are bound in, and `accumulate` adds to C the product over a later range of
// the inner dimension.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_a: u32,
    batch_b: u32,
    batch_c: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

override TA: bool = false;
override TB: bool = false;

fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if TA {
        return a[base + kk * p.lda + row];
    }
    return a[base + row * p.lda + kk];
}

fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if TB {
        return b[base + col * p.ldb + kk];
    }
    return b[base + kk * p.ldb + col];
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if row0 >= p.m || col0 >= p.n {
        return;
    }
    let ab = p.a_off + gid.z * p.batch_a;
    let bb = p.b_off + gid.z * p.batch_b;
    // Out-of-range rows and columns read the last valid one and are not stored.
    var rows: array<u32, 4>;
    var cols: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(row0 + i, p.m - 1u);
        cols[i] = min(col0 + i, p.n - 1u);
    }
    var acc: array<vec4<f32>, 4>;
    for (var kk = 0u; kk < p.k; kk++) {
        let bv = vec4<f32>(load_b(bb, kk, cols[0]), load_b(bb, kk, cols[1]), load_b(bb, kk, cols[2]),
            load_b(bb, kk, cols[3]));
        for (var i = 0u; i < 4u; i++) {
            acc[i] += load_a(ab, rows[i], kk) * bv;
        }
    }
    let cb = p.c_off + gid.z * p.batch_c;
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + i;
        if row < p.m {
            for (var j = 0u; j < 4u; j++) {
                if col0 + j < p.n {
                    let at = cb + row * p.ldc + col0 + j;
                    var v = acc[i][j];
                    if p.accumulate != 0u {
                        v += c[at];
                    }
                    c[at] = v;
                }
            }
        }
    }
}

// The same product with 16-byte loads, for operands whose contiguous axes are multiples of 4
// (N always; K unless A is transposed and B is not; M when A is transposed): a 4 x 4 block of C per invocation and four
// values of K per step, so each step does 64 FMAs for 8 loads instead of 16 for 8. The grid's z
// covers batch x SPLITS: split s sums K range [s * kc, (s + 1) * kc) into its own slice of C,
// which the caller reduces, so that a product with a long K and a small C (a weight gradient
// over many rows) still fills the device.
struct Params4 {
    m: u32,
    n: u32,
    k: u32,
    batch_a: u32,
    batch_b: u32,
    batch_c: u32,
    kc: u32,
    splits: u32,
}

@group(0) @binding(0) var<uniform> q: Params4;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c4: array<vec4<f32>>;

// The 4 x 4 block of C at (row0, col0) summed over K in [k0, k1).
fn block4(ab: u32, bb: u32, k0: u32, k1: u32, row0: u32, col0: u32) -> array<vec4<f32>, 4> {
    var rows: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(row0 + i, q.m - 1u);
    }
    var acc: array<vec4<f32>, 4>;
    for (var kk = k0; kk < k1; kk += 4u) {
        // av[i]: A at row i (TA: at k offset i), bv[j]: B at column j (!TB: at k offset j).
        var av: array<vec4<f32>, 4>;
        var bv: array<vec4<f32>, 4>;
        for (var i = 0u; i < 4u; i++) {
            if TA {
                // K need not be a multiple of 4 here: the rows past it count as zero.
                if kk + i < k1 {
                    av[i] = a4[(ab + (kk + i) * q.m + row0) / 4u];
                } else {
                    av[i] = vec4<f32>();
                }
            } else {
                av[i] = a4[(ab + rows[i] * q.k + kk) / 4u];
            }
            if TB {
                bv[i] = b4[(bb + min(col0 + i, q.n - 1u) * q.k + kk) / 4u];
            } else if !TA || kk + i < k1 {
                bv[i] = b4[(bb + (kk + i) * q.n + col0) / 4u];
            } else {
                bv[i] = vec4<f32>();
            }
        }
        for (var j = 0u; j < 4u; j++) {
            // The four columns of B at k offset j.
            var bk: vec4<f32>;
            if TB {
                bk = vec4<f32>(bv[0][j], bv[1][j], bv[2][j], bv[3][j]);
            } else {
                bk = bv[j];
            }
            for (var i = 0u; i < 4u; i++) {
                var a: f32;
                if TA {
                    a = av[j][i];
                } else {
                    a = av[i][j];
                }
                acc[i] += a * bk;
            }
        }
    }
    return acc;
}

@compute @workgroup_size(8, 32, 1)
fn matmul4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if row0 >= q.m || col0 >= q.n {
        return;
    }
    let batch = gid.z / q.splits;
    let split = gid.z % q.splits;
    let k0 = split * q.kc;
    let acc = block4(batch * q.batch_a, batch * q.batch_b, k0, min(q.k, k0 + q.kc), row0, col0);
    let cb = gid.z * q.batch_c;
    for (var i = 0u; i < 4u; i++) {
        if row0 + i < q.m {
            c4[(cb + (row0 + i) * q.n + col0) / 4u] = acc[i];
        }
    }
}

// A single product summed in splits, one invocation per (split, 4 x 4 block) over a flat grid,
// so that every lane of a workgroup works when C has few blocks.
@compute @workgroup_size(256)
fn matmul4_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    let nblocks = q.n / 4u;
    let mblocks = (q.m + 3u) / 4u;
    if t >= nblocks * mblocks * q.splits {
        return;
    }
    let col0 = (t % nblocks) * 4u;
    let row0 = ((t / nblocks) % mblocks) * 4u;
    let split = t / (nblocks * mblocks);
    let k0 = split * q.kc;
    let acc = block4(0u, 0u, k0, min(q.k, k0 + q.kc), row0, col0);
    let cb = split * q.batch_c;
    for (var i = 0u; i < 4u; i++) {
        if row0 + i < q.m {
            c4[(cb + (row0 + i) * q.n + col0) / 4u] = acc[i];
        }
    }
}

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

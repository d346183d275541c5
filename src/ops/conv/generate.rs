//! WGSL generators of the subgroup kernels: the skeleton's bindings and helpers
//! (shaders/conv3d.wgsl, shaders/conv3d_grad.wgsl) followed by one entry point whose tile is
//! unrolled into scalar registers.

use std::fmt::Write;

use crate::gpu::generated_shader;

/// The subgroup gather kernel for kernel size k, input stride s, m channels x v rows per lane.
pub(super) fn sg_gather_shader(k: usize, s: usize, m: usize, v: usize) -> &'static str {
    generated_shader(&format!("conv3d_sg_k{k}s{s}m{m}v{v}"), || sg_gather_source(k, s, m, v))
}

/// Lanes are 8 consecutive output z of one (n, class, channel block, x, y block). For each input
/// channel and x tap, each lane loads 1/8 of the weight block and the tile's input rows (8 s + k
/// values each, in `nl` loads of 8), and shuffles deliver the weights and the z-shifted inputs.
pub fn sg_gather_source(k: usize, s: usize, m: usize, v: usize) -> String {
    let rows = (v - 1) * s + k;
    let span = 7 * s + k;
    let nl = span.div_ceil(8);
    let wblk = k * k * m;
    let nw = wblk.div_ceil(8);
    let mut o = String::from(include_str!("../../../shaders/conv3d.wgsl"));
    let w = &mut o;
    let _ = writeln!(
        w,
        "
// Generated: kernel {k}, stride {s}, {m} channels x {v} rows per lane.
{head}    let r = cls_r(cls);
    let off = cls_off(r);
    let ext = cls_ext(r);
    let sx = i32(p.sx);
    let sy = i32(p.sy);
    let sz = i32(p.sz);
    let plane = sy * sz;
    let cstride = sx * plane;
    let z0 = i32(zb * {z8}u) + off.z;
    let y0 = i32(yb * {vs}u) + off.y;
    let sbase = i32(p.src_base + n * p.src_batch);
    let wbase = (cls * p.cblocks + cb) * p.cin * {wci}u + lane;",
        z8 = 8 * s,
        vs = v * s,
        wci = k * wblk,
        head = tile_entry("conv_sg", "xo", true)
    );
    for a in 0..m {
        for j in 0..v {
            let _ = writeln!(w, "    var a{a}_{j} = 0.0;");
        }
    }
    for q in 0..nl {
        let _ = writeln!(w, "    let zi{q} = z0 + i32(lane) + {};", 8 * q);
        let _ = writeln!(w, "    let zok{q} = zi{q} >= 0 && zi{q} < sz;");
    }
    let _ = writeln!(
        w,
        "    for (var ci = 0u; ci < p.cin; ci++) {{
        for (var dx = 0u; dx < {k}u; dx++) {{
            let xi = i32(xo * {s}u + dx) + off.x;
            let xok = xi >= 0 && xi < sx;
            let wb = wbase + (ci * {k}u + dx) * {wblk}u;
            let xb = sbase + i32(ci) * cstride + select(0, xi, xok) * plane;"
    );
    for q in 0..nw {
        let _ = writeln!(w, "            let w{q} = wt[wb + {}u];", 8 * q);
    }
    for row in 0..rows {
        let _ = writeln!(
            w,
            "            {{
                let yi = y0 + {row};
                let ok = xok && yi >= 0 && yi < sy;
                let rb = xb + select(0, yi, ok) * sz;"
        );
        for q in 0..nl {
            let _ = writeln!(w, "                let l{q} = src_at(rb + zi{q}, ok && zok{q});");
        }
        for dz in 0..k {
            // Lane l takes element l * s + dz of the row: from load (l * s + dz) / 8.
            let slots: Vec<usize> = {
                let mut v: Vec<usize> = (0..8).map(|l| (l * s + dz) / 8).collect();
                v.dedup();
                v
            };
            let idx = format!("sb + ((lane * {s}u + {dz}u) & 7u)");
            let mut e = format!("subgroupShuffle(l{}, {idx})", slots[0]);
            for &q in &slots[1..] {
                e = format!("select({e}, subgroupShuffle(l{q}, {idx}), lane * {s}u + {dz}u >= {}u)", 8 * q);
            }
            let _ = writeln!(w, "                let v{dz} = {e};");
        }
        for dz in 0..k {
            for j in 0..v {
                let Some(dy) = row.checked_sub(j * s).filter(|&d| d < k) else { continue };
                for a in 0..m {
                    let e = (dy * k + dz) * m + a;
                    let _ = writeln!(
                        w,
                        "                a{a}_{j} = fma(subgroupShuffle(w{}, sb + {}u), v{dz}, a{a}_{j});",
                        e / 8,
                        e % 8
                    );
                }
            }
        }
        let _ = writeln!(w, "            }}");
    }
    let _ = writeln!(
        w,
        "        }}
    }}
    let zo = zb * 8u + lane;
    if !live || zo >= ext.z || xo >= ext.x {{
        return;
    }}
    // Interior tiles store without per-element bounds (a quarter of a 1x1 convolution's time).
    let cs = p.ox * p.oy * p.oz;
    let rs = p.os * p.oz;
    let base = dst_index(n, cb * {m}u, vec3<u32>(xo, yb * {v}u, zo), r);
    if zb * 8u + 8u <= ext.z && yb * {v}u + {v}u <= ext.y && cb * {m}u + {m}u <= p.cout {{"
    );
    for a in 0..m {
        let _ = writeln!(w, "        let b{a} = bias_of(cb * {m}u + {a}u);");
        for j in 0..v {
            let _ = writeln!(w, "        dst[base + {a}u * cs + {j}u * rs] = a{a}_{j} + b{a};");
        }
    }
    let _ = writeln!(w, "        return;\n    }}");
    for a in 0..m {
        let _ = writeln!(
            w,
            "    if cb * {m}u + {a}u < p.cout {{
        let b = bias_of(cb * {m}u + {a}u);"
        );
        for j in 0..v {
            let _ = writeln!(
                w,
                "        if yb * {v}u + {j}u < ext.y {{
            dst[base + {a}u * cs + {j}u * rs] = a{a}_{j} + b;
        }}"
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

/// The subgroup gather kernel of a stride-1 "same" convolution (odd kernel size k, padding
/// (k - 1) / 2 along z, one class) whose rows along z are whole vectors of z (2 or 4): m channels
/// x v rows x z outputs along z per lane, `lanes` lanes along a row (1, 2, 4 or 8).
pub(super) fn sg_gather_vec_shader(
    k: usize,
    m: usize,
    v: usize,
    z: usize,
    lanes: usize,
    whole: bool,
) -> &'static str {
    generated_shader(&format!("conv3d_sgv_k{k}m{m}v{v}z{z}l{lanes}w{}", whole as u8), || {
        sg_gather_vec_source(k, m, v, z, lanes, whole)
    })
}

/// Each lane holds z consecutive outputs along z of v rows along y; the 8 lanes of a tile are
/// 8 / `lanes` groups of rows (of one (n, channel block, x)), each group `lanes` consecutive
/// vectors along z. An output's input row is the same z range widened by h = (k - 1) / 2 on each
/// side. For each input channel and x tap, each lane loads 1/8 of the weight block (as vec4s,
/// broadcast by shuffles once per (channel, x tap) to serve v x z accumulators), and per input
/// row its own vector of z inputs; the h values on either side come from the neighbouring lanes
/// of its group by shuffles, and from beyond the group's z range: the padding's zeros when the
/// group spans the row (`whole`, always with fewer than 8 lanes along it), else one halo vector
/// per row (lane 0 the vector before the tile, lane 7 the one after it). Loads and shuffles per
/// FMA are z times fewer than in the scalar tile (`conv_sg`).
pub fn sg_gather_vec_source(k: usize, m: usize, v: usize, z: usize, lanes: usize, whole: bool) -> String {
    assert!(k % 2 == 1 && (z == 2 || z == 4) && (k - 1) / 2 <= z, "vector gather tile k {k} z {z}");
    assert!(m.is_multiple_of(4), "vector gather tiles read the weights as vec4s");
    assert!([1, 2, 4, 8].contains(&lanes) && (whole || lanes == 8), "{lanes} lanes along a row");
    let h = (k - 1) / 2;
    let groups = 8 / lanes;
    let rows = v + k - 1;
    let wblk = k * k * m;
    let nw4 = (wblk / 4).div_ceil(8);
    let comp = ["x", "y", "z", "w"];
    let mut o = String::from(include_str!("../../../shaders/conv3d.wgsl"));
    let w = &mut o;
    let halo = if whole {
        String::new()
    } else {
        format!(
            "    // The halo vector: lane 0 the one before the tile, lane 7 the one after it.
    let hz = select(zl + {z}, zl - {z}, lane == 0u);
    let hok = hz >= 0 && hz < sz;
"
        )
    };
    let _ = writeln!(
        w,
        "
@group(0) @binding(1) var<storage, read> src_v: array<vec{z}<f32>>;
@group(0) @binding(2) var<storage, read> wt4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dst_v: array<vec{z}<f32>>;

// Generated: stride-1 same convolution, kernel {k}, {m} channels x {v} rows x {z} z per lane,
// {lanes} lanes along a row.
{head}    let off = p.off[0];
    let sx = i32(p.sx);
    let sy = i32(p.sy);
    let sz = i32(p.sz);
    let plane = sy * sz;
    let cstride = sx * plane;
    let lg = lane / {lanes}u;
    let lz = lane % {lanes}u;
    let zl = i32((zb * {lanes}u + lz) * {z}u);
    let zok = zl < sz;
{halo}    let yo = (yb * {groups}u + lg) * {v}u;
    let y0 = i32(yo) + off.y;
    let sbase = i32(p.src_base + n * p.src_batch);
    let wbase = cb * p.cin * {wci4}u + lane;
    let wlast = arrayLength(&wt4) - 1u;
    let prev = sb + lg * {lanes}u + (lz + {lm1}u) % {lanes}u;
    let next = sb + lg * {lanes}u + (lz + 1u) % {lanes}u;",
        wci4 = k * wblk / 4,
        lm1 = lanes - 1,
        head = tile_entry("conv_sgv", "xo", false)
    );
    for a in 0..m {
        for j in 0..v {
            for q in 0..z {
                let _ = writeln!(w, "    var a{a}_{j}_{q} = 0.0;");
            }
        }
    }
    let _ = writeln!(
        w,
        "    for (var ci = 0u; ci < p.cin; ci++) {{
        for (var dx = 0u; dx < {k}u; dx++) {{
            let xi = i32(xo + dx) + off.x;
            let xok = xi >= 0 && xi < sx;
            let wb = wbase + (ci * {k}u + dx) * {wblk4}u;
            let xb = sbase + i32(ci) * cstride + select(0, xi, xok) * plane;",
        wblk4 = wblk / 4
    );
    for q in 0..nw4 {
        let _ = writeln!(w, "            let w{q} = wt4[min(wb + {}u, wlast)];", 8 * q);
    }
    for dy in 0..k {
        for dz in 0..k {
            for a in 0..m {
                let e = (dy * k + dz) * m + a;
                let _ = writeln!(
                    w,
                    "            let k{dy}_{dz}_{a} = subgroupShuffle(w{}.{}, sb + {}u);",
                    e / 32,
                    comp[e % 4],
                    (e / 4) % 8
                );
            }
        }
    }
    for row in 0..rows {
        let _ = writeln!(
            w,
            "            {{
                let yi = y0 + {row};
                let ok = xok && yi >= 0 && yi < sy;
                let rb = xb + select(0, yi, ok) * sz;
                let r = select(vec{z}<f32>(0.0), src_v[u32(rb + select(0, zl, zok)) / {z}u], ok && zok);"
        );
        write_halo(w, "src_v", z, h, lanes, whole);
        for j in 0..v {
            let Some(dy) = row.checked_sub(j).filter(|&d| d < k) else { continue };
            for dz in 0..k {
                for a in 0..m {
                    for q in 0..z {
                        let x = halo_input(z, q as isize + dz as isize - h as isize);
                        let _ = writeln!(
                            w,
                            "                a{a}_{j}_{q} = fma(k{dy}_{dz}_{a}, {x}, a{a}_{j}_{q});"
                        );
                    }
                }
            }
        }
        let _ = writeln!(w, "            }}");
    }
    let _ = writeln!(
        w,
        "        }}
    }}
    if !live || !zok || xo >= p.ox {{
        return;
    }}
    let cs = p.ox * p.oy * p.oz;
    let base = (p.dst_base + n * p.dst_batch + ((cb * {m}u * p.ox + xo) * p.oy + yo) * p.oz + u32(zl)) / {z}u;
    let vcs = cs / {z}u;
    let vrs = p.oz / {z}u;
    if yo + {v}u <= p.oy && cb * {m}u + {m}u <= p.cout {{"
    );
    let value = |a: usize, j: usize, b: &str| -> String {
        let parts: Vec<String> = (0..z).map(|q| format!("a{a}_{j}_{q}")).collect();
        format!("vec{z}<f32>({}) + {b}", parts.join(", "))
    };
    for a in 0..m {
        let _ = writeln!(w, "        let b{a} = bias_of(cb * {m}u + {a}u);");
        for j in 0..v {
            let _ = writeln!(
                w,
                "        dst_v[base + {a}u * vcs + {j}u * vrs] = {};",
                value(a, j, &format!("b{a}"))
            );
        }
    }
    let _ = writeln!(w, "        return;\n    }}");
    for a in 0..m {
        let _ = writeln!(
            w,
            "    if cb * {m}u + {a}u < p.cout {{
        let b = bias_of(cb * {m}u + {a}u);"
        );
        for j in 0..v {
            let _ = writeln!(
                w,
                "        if yo + {j}u < p.oy {{
            dst_v[base + {a}u * vcs + {j}u * vrs] = {};
        }}",
                value(a, j, "b")
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

/// The value at z offset i (-h..z + h) of a lane's row vector `r` of z values widened by the
/// halo values of `write_halo`.
fn halo_input(z: usize, i: isize) -> String {
    let comp = ["x", "y", "z", "w"];
    if i < 0 {
        format!("lm{}", -i)
    } else if (i as usize) < z {
        format!("r.{}", comp[i as usize])
    } else {
        format!("rp{}", i as usize - z + 1)
    }
}

/// The h values on either side of a lane's row vector `r` (z values), `lm1..` to the left and
/// `rp1..` to the right: from the neighbouring lanes of its group of `lanes` along the row
/// (`prev`, `next`), and past the group's ends from the halo vector `hv` (read here from `src`
/// at the row `rb`, element `hz`) or, for a group spanning the row (`whole`), the padding's zeros.
fn write_halo(w: &mut String, src: &str, z: usize, h: usize, lanes: usize, whole: bool) {
    let comp = ["x", "y", "z", "w"];
    if !whole {
        let _ = writeln!(
            w,
            "                let hv = select(vec{z}<f32>(0.0), {src}[u32(rb + select(0, hz, hok)) / {z}u], ok && hok);"
        );
    }
    for t in 1..=h {
        let (l, r) = (comp[z - t], comp[t - 1]);
        if lanes == 1 {
            let _ = writeln!(w, "                let lm{t} = 0.0;\n                let rp{t} = 0.0;");
            continue;
        }
        let (hl, hr) =
            if whole { ("0.0".into(), "0.0".into()) } else { (format!("hv.{l}"), format!("hv.{r}")) };
        let _ = writeln!(
            w,
            "                let lm{t} = select(subgroupShuffle(r.{l}, prev), {hl}, lz == 0u);
                let rp{t} = select(subgroupShuffle(r.{r}, next), {hr}, lz == {}u);",
            lanes - 1
        );
    }
}

/// The subgroup kernel of a k2 s2 convolution without padding, m channels x v rows x z / 2
/// outputs along z per lane, input rows read as vectors of z (2 or 4).
pub(super) fn sg_down_shader(m: usize, v: usize, z: usize) -> &'static str {
    generated_shader(&format!("conv3d_down_sg_m{m}v{v}z{z}"), || sg_down_source(m, v, z))
}

/// `dst[n, o, q] = bias[o] + sum_i sum_t src[n, i, 2 q + t] * W[o, i, t]` over the eight taps t of
/// a 2x2x2 kernel (stride 2, no padding: conv3d's k2 s2 forward, the transposed convolution's
/// input gradient), W read in place as `[cout][cin][8]` (both weight layouts are that, with their
/// own roles of the channels). Lanes hold z / 2 consecutive q along z each, 8 lanes a tile row;
/// each lane reads the input it needs as one vector of z per input row (the view `src_v` of the
/// source binding, whose rows must be whole vectors), and 1/8 of the weight block (m channels'
/// 8 taps) as vec4s (`wt4`), shared by shuffles.
pub fn sg_down_source(m: usize, v: usize, z: usize) -> String {
    assert!(z == 2 || z == 4, "k2 s2 rows are read as vec2 or vec4");
    let zq = z / 2;
    let w4 = 2 * m;
    let nw = w4.div_ceil(8);
    let comp = ["x", "y", "z", "w"];
    let mut o = String::from(include_str!("../../../shaders/conv3d.wgsl"));
    let w = &mut o;
    let dst_decl = if zq == 1 {
        String::new()
    } else {
        format!("@group(0) @binding(4) var<storage, read_write> dst_v: array<vec{zq}<f32>>;\n")
    };
    let _ = writeln!(
        w,
        "
@group(0) @binding(1) var<storage, read> src_v: array<vec{z}<f32>>;
@group(0) @binding(2) var<storage, read> wt4: array<vec4<f32>>;
{dst_decl}
// Generated: k2 s2 convolution, {m} channels x {v} rows x {zq} z per lane, rows as vec{z}.
{head}    let q0 = (zb * 8u + lane) * {zq}u;
    let y0 = yb * {v}u;
    let xok = q0 < p.oz && xo < p.ox;
    let plane = p.sy * p.sz;
    // In vectors of {z}: sample n, x 2 xo, z 2 q0 of the source.
    let sbase = (p.src_base + n * p.src_batch + 2u * select(0u, xo, xok) * plane + 2u * select(0u, q0, xok)) / {z}u;",
        head = tile_entry("down_sg", "xo", false)
    );
    for c in 0..nw {
        // Lane l reads vec4 c' = l + 8 c of the block: half c' % 2 of channel c' / 2's taps.
        let _ = writeln!(
            w,
            "    let wl{c} = min(cb * {m}u + min(lane + {}u, {}u) / 2u, p.cout - 1u) * p.cin * 2u + (lane & 1u);",
            8 * c,
            w4 - 1
        );
    }
    for a in 0..m {
        for j in 0..v {
            for q in 0..zq {
                let _ = writeln!(w, "    var a{a}_{j}_{q} = 0.0;");
            }
        }
    }
    for j in 0..v {
        let _ = writeln!(w, "    let ok{j} = xok && y0 + {j}u < p.oy;");
    }
    let _ = writeln!(
        w,
        "    for (var ci = 0u; ci < p.cin; ci++) {{
        let cbase = sbase + ci * p.sx * plane / {z}u;"
    );
    for c in 0..nw {
        let _ = writeln!(w, "        let w{c} = wt4[wl{c} + ci * 2u];");
    }
    // Input rows (tx, j, ty): z values at 2 q0 of row 2 (y0 + j) + ty of x 2 xo + tx.
    for tx in 0..2 {
        for j in 0..v {
            for ty in 0..2 {
                let _ = writeln!(
                    w,
                    "        let r{tx}_{j}_{ty} = select(vec{z}<f32>(0.0), src_v[select(0u, cbase + ({tx}u * plane + (2u * (y0 + {j}u) + {ty}u) * p.sz) / {z}u, ok{j})], ok{j});"
                );
            }
        }
    }
    for t in 0..8 {
        let (tx, ty, tz) = (t >> 2, (t >> 1) & 1, t & 1);
        let _ = writeln!(w, "        {{");
        write_tap_weights(w, m, t);
        for j in 0..v {
            for q in 0..zq {
                let x = format!("r{tx}_{j}_{ty}.{}", comp[2 * q + tz]);
                for a in 0..m {
                    let _ = writeln!(w, "            a{a}_{j}_{q} = fma(k{a}, {x}, a{a}_{j}_{q});");
                }
            }
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(
        w,
        "    }}
    if !live || !xok {{
        return;
    }}
    let cs = p.ox * p.oy * p.oz;
    let base = p.dst_base + n * p.dst_batch + ((cb * {m}u * p.ox + xo) * p.oy + y0) * p.oz + q0;"
    );
    for a in 0..m {
        let _ = writeln!(
            w,
            "    if cb * {m}u + {a}u < p.cout {{
        let b = bias_of(cb * {m}u + {a}u);"
        );
        for j in 0..v {
            let at = format!("base + {a}u * cs + {j}u * p.oz");
            let val = if zq == 1 {
                format!("dst[{at}] = a{a}_{j}_0 + b;")
            } else {
                let parts: Vec<String> = (0..zq).map(|q| format!("a{a}_{j}_{q} + b")).collect();
                format!("dst_v[({at}) / {zq}u] = vec{zq}<f32>({});", parts.join(", "))
            };
            let _ = writeln!(w, "        if y0 + {j}u < p.oy {{\n            {val}\n        }}");
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

pub(super) fn sg_up_shader(m: usize, v: usize) -> &'static str {
    generated_shader(&format!("conv3d_up_sg_m{m}v{v}"), || sg_up_source(m, v))
}

/// `out[n, o, 2q + t] = bias[o] + sum_i src[n, i, q] * W[i, o, t]` for the eight taps t of a k2 s2
/// transposed convolution. Lanes are 8 consecutive q along z of one (n, channel block, qx, block
/// of v rows along y); each lane holds m channels x v rows x 8 taps. For each input channel a lane
/// loads 1/8 of the weight block (8 m values, `[i][t][m]`) and its own v inputs. q runs over
/// ceil(out / 2) per axis, reading 0 past the input (an odd output extent).
pub fn sg_up_source(m: usize, v: usize) -> String {
    let mut o = String::from(include_str!("../../../shaders/conv3d.wgsl"));
    let w = &mut o;
    let _ = writeln!(
        w,
        "
// Generated: k2 s2 transposed convolution, {m} channels x {v} rows x 8 taps per lane.
{head}    let qz = zb * 8u + lane;
    let qy0 = yb * {v}u;
    let plane = p.sy * p.sz;
    let xok = qx < p.sx && qz < p.sz;
    let sbase = p.src_base + n * p.src_batch + select(0u, qx, xok) * plane + select(0u, qz, xok);
    let wbase = cb * p.cin * {wci}u + lane;",
        wci = 8 * m,
        head = tile_entry("up_sg", "qx", false)
    );
    for a in 0..m {
        for j in 0..v {
            for t in 0..8 {
                let _ = writeln!(w, "    var a{a}_{j}_{t} = 0.0;");
            }
        }
    }
    let _ = writeln!(
        w,
        "    for (var ci = 0u; ci < p.cin; ci++) {{
        let wb = wbase + ci * {wci}u;
        let cbase = sbase + ci * p.sx * plane;",
        wci = 8 * m
    );
    for q in 0..m {
        let _ = writeln!(w, "        let w{q} = wt[wb + {}u];", 8 * q);
    }
    for j in 0..v {
        let _ = writeln!(
            w,
            "        let ok{j} = xok && qy0 + {j}u < p.sy;
        let x{j} = src_at(i32(cbase + select(0u, qy0 + {j}u, ok{j}) * p.sz), ok{j});"
        );
    }
    for t in 0..8 {
        for a in 0..m {
            let e = t * m + a;
            let _ = writeln!(
                w,
                "        {{
            let we = subgroupShuffle(w{}, sb + {}u);",
                e / 8,
                e % 8
            );
            for j in 0..v {
                let _ = writeln!(w, "            a{a}_{j}_{t} = fma(we, x{j}, a{a}_{j}_{t});");
            }
            let _ = writeln!(w, "        }}");
        }
    }
    let _ = writeln!(
        w,
        "    }}
    if !live || 2u * qz >= p.oz || 2u * qx >= p.ox {{
        return;
    }}
    let cs = p.ox * p.oy * p.oz;
    let xs = p.oy * p.oz;
    let base = dst_index(n, cb * {m}u, vec3<u32>(qx, qy0, qz), vec3<u32>(0u));
    let full = zb * 16u + 16u <= p.oz && 2u * (qy0 + {v}u) <= p.oy && 2u * qx + 2u <= p.ox;
    if full && cb * {m}u + {m}u <= p.cout {{"
    );
    let off = |j: usize, t: usize| {
        let (tx, ty, tz) = (t >> 2, (t >> 1) & 1, t & 1);
        format!("{tx}u * xs + {}u * p.oz + {tz}u", 2 * j + ty)
    };
    for a in 0..m {
        let _ = writeln!(w, "        let b{a} = bias_of(cb * {m}u + {a}u);");
        for j in 0..v {
            for t in 0..8 {
                let _ = writeln!(w, "        dst[base + {a}u * cs + {}] = a{a}_{j}_{t} + b{a};", off(j, t));
            }
        }
    }
    let _ = writeln!(w, "        return;\n    }}");
    for a in 0..m {
        let _ = writeln!(
            w,
            "    if cb * {m}u + {a}u < p.cout {{
        let b = bias_of(cb * {m}u + {a}u);"
        );
        for j in 0..v {
            for t in 0..8 {
                let (tx, ty, tz) = (t >> 2, (t >> 1) & 1, t & 1);
                let _ = writeln!(
                    w,
                    "        if all(vec3<u32>(2u * qx + {tx}u, 2u * (qy0 + {j}u) + {ty}u, 2u * qz + {tz}u) < vec3<u32>(p.ox, p.oy, p.oz)) {{
            dst[base + {a}u * cs + {}] = a{a}_{j}_{t} + b;
        }}",
                    off(j, t)
                );
            }
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

/// The k2 s2 transposed convolution kernel writing rows along z as vectors of z (2 or 4), m
/// channels x v rows per lane.
pub(super) fn sg_up_vec_shader(m: usize, v: usize, z: usize) -> &'static str {
    generated_shader(&format!("conv3d_upv_sg_m{m}v{v}z{z}"), || sg_up_vec_source(m, v, z))
}

/// `out[n, o, 2q + t] = bias[o] + sum_i src[n, i, q] * W[i, o, t]` for the eight taps t, W read in
/// place as `[cin][cout][8]` (both callers' layouts). Lanes hold z / 2 consecutive q along z each,
/// 8 lanes a tile row, with m channels x v rows x 8 taps; for each input channel a lane reads its
/// inputs of each row as one vector of z / 2 (`src_v`, scalar for z = 2) and 1/8 of the weight
/// block (m channels' 8 taps, contiguous) as vec4s, shared by shuffles; each output row of a lane
/// is one vector of z (`dst_v`). Rows along z of the input and output must be whole vectors,
/// the output's twice the input's; along x and y q runs over ceil(out / 2), reading 0 past the
/// input (an odd output extent).
pub fn sg_up_vec_source(m: usize, v: usize, z: usize) -> String {
    assert!(z == 2 || z == 4, "up rows are written as vec2 or vec4");
    let zq = z / 2;
    let w4 = 2 * m;
    let nw = w4.div_ceil(8);
    let comp = ["x", "y", "z", "w"];
    let mut o = String::from(include_str!("../../../shaders/conv3d.wgsl"));
    let w = &mut o;
    let src_decl = if zq == 1 {
        String::new()
    } else {
        format!("@group(0) @binding(1) var<storage, read> src_v: array<vec{zq}<f32>>;\n")
    };
    let _ = writeln!(
        w,
        "
{src_decl}@group(0) @binding(2) var<storage, read> wt4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dst_v: array<vec{z}<f32>>;

// Generated: k2 s2 transposed convolution, {m} channels x {v} rows x 8 taps x {zq} z per lane,
// output rows as vec{z}.
{head}    let qz = (zb * 8u + lane) * {zq}u;
    let qy0 = yb * {v}u;
    let plane = p.sy * p.sz;
    let xok = qx < p.sx && qz < p.sz;
    let sbase = p.src_base + n * p.src_batch + select(0u, qx, xok) * plane + select(0u, qz, xok);
    let wlast = arrayLength(&wt4) - 1u;",
        head = tile_entry("upv_sg", "qx", false)
    );
    for c in 0..nw {
        // Lane l reads vec4 c' = l + 8 c of the block: half c' % 2 of channel c' / 2's taps.
        let _ = writeln!(w, "    let wl{c} = cb * {w4}u + min(lane + {}u, {}u);", 8 * c, w4 - 1);
    }
    for a in 0..m {
        for j in 0..v {
            for t in 0..8 {
                for q in 0..zq {
                    let _ = writeln!(w, "    var a{a}_{j}_{t}_{q} = 0.0;");
                }
            }
        }
    }
    for j in 0..v {
        let _ = writeln!(w, "    let ok{j} = xok && qy0 + {j}u < p.sy;");
    }
    let _ = writeln!(
        w,
        "    for (var ci = 0u; ci < p.cin; ci++) {{
        let wb = ci * p.cout * 2u;
        let cbase = sbase + ci * p.sx * plane;"
    );
    for c in 0..nw {
        let _ = writeln!(w, "        let w{c} = wt4[min(wb + wl{c}, wlast)];");
    }
    for j in 0..v {
        let at = format!("cbase + select(0u, qy0 + {j}u, ok{j}) * p.sz");
        if zq == 1 {
            let _ = writeln!(w, "        let x{j} = select(0.0, src[{at}], ok{j});");
        } else {
            let _ =
                writeln!(w, "        let x{j} = select(vec{zq}<f32>(0.0), src_v[({at}) / {zq}u], ok{j});");
        }
    }
    for t in 0..8 {
        let _ = writeln!(w, "        {{");
        write_tap_weights(w, m, t);
        for j in 0..v {
            for (q, c) in comp.iter().enumerate().take(zq) {
                let x = if zq == 1 { format!("x{j}") } else { format!("x{j}.{c}") };
                for a in 0..m {
                    let _ = writeln!(w, "            a{a}_{j}_{t}_{q} = fma(k{a}, {x}, a{a}_{j}_{t}_{q});");
                }
            }
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(
        w,
        "    }}
    if !live || qz >= p.sz || 2u * qx >= p.ox {{
        return;
    }}
    let cs = p.ox * p.oy * p.oz;
    let xs = p.oy * p.oz;
    // In vectors of {z}: channel cb * {m}, x 2 qx, y 2 qy0, z 2 qz.
    let base = (p.dst_base + n * p.dst_batch + ((cb * {m}u * p.ox + 2u * qx) * p.oy + 2u * qy0) * p.oz + 2u * qz) / {z}u;
    let xin = 2u * qx + 1u < p.ox;"
    );
    for a in 0..m {
        let _ = writeln!(
            w,
            "    if cb * {m}u + {a}u < p.cout {{
        let b = bias_of(cb * {m}u + {a}u);"
        );
        for j in 0..v {
            for tx in 0..2 {
                for ty in 0..2 {
                    let mut parts = Vec::new();
                    for q in 0..zq {
                        for tz in 0..2 {
                            let t = tx * 4 + ty * 2 + tz;
                            parts.push(format!("a{a}_{j}_{t}_{q} + b"));
                        }
                    }
                    let cond = if tx == 1 { "xin && " } else { "" };
                    let _ = writeln!(
                        w,
                        "        if {cond}2u * (qy0 + {j}u) + {ty}u < p.oy {{
            dst_v[base + ({a}u * cs + {tx}u * xs + {}u * p.oz) / {z}u] = vec{z}<f32>({});
        }}",
                        2 * j + ty,
                        parts.join(", ")
                    );
                }
            }
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    o
}

/// The weight-gradient kernel of a stride-1 convolution padded by (k - 1) / 2 along z whose rows
/// along z are whole vectors of z (2 or 4): m A channels x v B channels per tile, r rows along y
/// per lane a step, `lanes` lanes along a row (1, 2, 4 or 8).
pub(super) fn sg_wgrad_vec_shader(
    k: usize,
    m: usize,
    v: usize,
    r: usize,
    z: usize,
    lanes: usize,
    whole: bool,
) -> &'static str {
    let name = format!("conv3d_gradv_k{k}m{m}v{v}r{r}z{z}l{lanes}w{}", whole as u8);
    generated_shader(&name, || sg_wgrad_vec_source(k, m, v, r, z, lanes, whole))
}

/// All lanes of a tile hold its m A channels and v B channels, each summing every (A channel,
/// B channel, tap) over its own vectors of z along z; the lanes' sums are added by shuffles at the
/// end. The 8 lanes are 8 / `lanes` groups of r consecutive rows (n, qx, qy) of a step, each group
/// `lanes` consecutive vectors along z: a pass covers `lanes` x z of its rows. A pass reads, per
/// lane, one vector of A per A channel and row, and one vector of B per B channel, x tap and B row
/// under its r rows ((r - 1) + k of them, each serving every row above it); the h = (k - 1) / 2
/// values on either side of a lane's B vector come from its neighbours along the row by
/// shuffles, and from beyond the pass from a halo vector (lane 0 the one before the pass, lane 7
/// the one after it) or, when the pass spans the row (`whole`, always with fewer than 8 lanes
/// along it), are the padding's zeros.
pub fn sg_wgrad_vec_source(
    k: usize,
    m: usize,
    v: usize,
    r: usize,
    z: usize,
    lanes: usize,
    whole: bool,
) -> String {
    assert!(k % 2 == 1 && (z == 2 || z == 4) && (k - 1) / 2 <= z, "vector wgrad tile k {k} z {z}");
    assert!([1, 2, 4, 8].contains(&lanes) && (whole || lanes == 8), "{lanes} lanes along a row");
    let h = (k - 1) / 2;
    let step = 8 / lanes * r;
    let k3 = k * k * k;
    let comp = ["x", "y", "z", "w"];
    let mut o = String::from(include_str!("../../../shaders/conv3d_grad.wgsl"));
    let w = &mut o;
    let _ = writeln!(
        w,
        "
@group(0) @binding(1) var<storage, read> a_v: array<vec{z}<f32>>;
@group(0) @binding(2) var<storage, read> b_v: array<vec{z}<f32>>;

// Generated: stride-1 same convolution, kernel {k}, {m} A channels x {v} B channels per tile, {r}
// rows and {z} z per lane, {lanes} lanes along a row.
{head}    let lg = lane / {lanes}u;
    let lz = lane % {lanes}u;
    let prev = sb + lg * {lanes}u + (lz + {lm1}u) % {lanes}u;
    let next = sb + lg * {lanes}u + (lz + 1u) % {lanes}u;",
        lm1 = lanes - 1,
        head = wgrad_entry("wgrad_sgv", step)
    );
    for i in 0..m {
        let _ = writeln!(w, "    let ch{i} = ab * {m}u + {i}u;\n    let chok{i} = ch{i} < p.ca;");
    }
    write_wgrad_sums(w, m, v, k3);
    let _ = writeln!(
        w,
        "    // (n, qx, first qy) of the step, stepped without divisions (slow per lane on software
    // devices); this lane's rows are qy .. qy + {r}.
    var n = row0 / (p.ax * yblocks);
    var qx = (row0 / yblocks) % p.ax;
    var qy0 = (row0 % yblocks) * {step}u;
    for (var row = row0; row < row1; row++) {{
        let qy = qy0 + lg * {r}u;
        let bbase = i32(p.b_base + n * p.b_batch);
        let xi0 = i32(qx) + p.off.x;
        let yi0 = i32(qy) + p.off.y;"
    );
    for rr in 0..r {
        let _ = writeln!(
            w,
            "        let yok{rr} = qy + {rr}u < p.ay;
        let abase{rr} = p.a_base + n * p.a_batch + (qx * p.ay + select(0u, qy + {rr}u, yok{rr})) * p.az;"
        );
    }
    if whole {
        let _ = writeln!(w, "        {{\n            let zl = lz * {z}u;");
    } else {
        let _ = writeln!(
            w,
            "        for (var z0 = 0u; z0 < p.az; z0 += {}u) {{
            let zl = z0 + lane * {z}u;
            // The halo vector: lane 0 the one before the pass, lane 7 the one after it.
            let hz = select(i32(zl) + {z}, i32(zl) - {z}, lane == 0u);
            let hok = hz >= 0 && hz < bz;",
            8 * z
        );
    }
    let _ = writeln!(w, "            let zok = zl < p.az;");
    for rr in 0..r {
        for i in 0..m {
            let _ = writeln!(
                w,
                "            let av{i}_{rr} = select(vec{z}<f32>(0.0), a_v[select(0u, abase{rr} + ch{i} * astride + zl, chok{i} && zok && yok{rr}) / {z}u], chok{i} && zok && yok{rr});"
            );
        }
    }
    for b in 0..v {
        for dx in 0..k {
            for yy in 0..r + k - 1 {
                let _ = writeln!(
                    w,
                    "            {{
                let xi = xi0 + {dx};
                let yi = yi0 + {yy};
                let ok = bcok{b} && xi >= 0 && xi < bx && yi >= 0 && yi < by;
                let rb = bbase + i32(bc{b}) * bstride + (select(0, xi, ok) * by + select(0, yi, ok)) * bz;
                let r = select(vec{z}<f32>(0.0), b_v[u32(rb + select(0, i32(zl), zok)) / {z}u], ok && zok);"
                );
                write_halo(w, "b_v", z, h, lanes, whole);
                for rr in 0..r {
                    let Some(dy) = yy.checked_sub(rr).filter(|&d| d < k) else { continue };
                    for dz in 0..k {
                        let t = (dx * k + dy) * k + dz;
                        for (q, c) in comp.iter().enumerate().take(z) {
                            let e = halo_input(z, q as isize + dz as isize - h as isize);
                            for i in 0..m {
                                let _ = writeln!(
                                    w,
                                    "                g{i}_{b}_{t} = fma(av{i}_{rr}.{c}, {e}, g{i}_{b}_{t});"
                                );
                            }
                        }
                    }
                }
                let _ = writeln!(w, "            }}");
            }
        }
    }
    write_wgrad_tail(w, step, m, v, k3, 1);
    o
}

/// The subgroup weight-gradient kernel for kernel size k, stride s, m A channels per lane, v B
/// channels per tile, r output rows (along y) per step and rows read as vectors of z (1 or 4).
pub(super) fn sg_wgrad_shader(
    k: usize,
    s: usize,
    m: usize,
    v: usize,
    r: usize,
    z: usize,
    lz: usize,
) -> &'static str {
    let name = format!("conv3d_grad_sg_k{k}s{s}m{m}v{v}r{r}z{z}l{lz}");
    generated_shader(&name, || sg_wgrad_source(k, s, m, v, r, z, lz))
}

/// Lanes are 8 channels of A (m each); a tile walks its chunk of steps (n, qx, r rows along y)
/// in runs of 8 z (16 when z = 4). Each lane loads its channels' r rows of A; each B row under
/// the step (8 s + k values, 16 s + k when z = 4; (r - 1) s + k rows per x tap) is loaded once
/// per tile, 8 lanes at a time, and broadcast by shuffles to every tap along z and every output
/// row it serves. With z = 2 the B rows are read as vec2 (the view `src_bv` of the binding) and
/// A's 8 values of a step as the 2 or 3 vec4s holding them (`src_a4`, at any alignment); with
/// z = 4 the A and B rows as vec4 (`src_a4`, `src_bv`). Rows read as vectors of z must start at
/// multiples of z elements and hold a multiple of z, so that a vector is wholly inside or
/// outside a row.
pub fn sg_wgrad_source(k: usize, s: usize, m: usize, v: usize, r: usize, z: usize, lz: usize) -> String {
    assert!([1, 2, 4].contains(&z), "wgrad rows are read as scalars, vec2 or vec4");
    let zs = if z == 4 { 16 } else { 8 };
    let span = (zs - 1) * s + k;
    // B spans are read z values per lane (vec2: B only; vec4: A too).
    let nl = span.div_ceil(8 * z);
    // Lane groups along z: each lane covers zl of the step's zs values, from element qs of its
    // B span (in vectors of 4), and 8 / lz lanes cover the tile's A channels.
    assert!(
        lz == 1 || (z == 4 && nl == 1 && (zs / lz * s).is_multiple_of(4)),
        "lanes split along z: vec4, one B load"
    );
    let (zl, la) = (zs / lz, 8 / lz);
    let comp = ["x", "y", "z", "w"];
    let k3 = k * k * k;
    let brows = (r - 1) * s + k;
    let mut o = String::from(include_str!("../../../shaders/conv3d_grad.wgsl"));
    let w = &mut o;
    if z > 1 {
        let _ = writeln!(
            w,
            "
@group(0) @binding(1) var<storage, read> src_a4: array<vec4<f32>>;

fn a4_at(i: u32, ok: bool) -> vec4<f32> {{
    return select(vec4<f32>(0.0), src_a4[select(0u, i, ok)], ok);
}}

// The 8 values of A from element i on, at any alignment: the 2 or 3 vec4s that hold them
// (the last vec4 of the binding past the end; the caller masks values past its row).
fn a8_at(i: u32, ok: bool) -> array<vec4<f32>, 3> {{
    let q = i / 4u;
    let last = arrayLength(&src_a4) - 1u;
    return array<vec4<f32>, 3>(a4_at(min(q, last), ok), a4_at(min(q + 1u, last), ok), a4_at(min(q + 2u, last), ok && i % 4u != 0u));
}}"
        );
    }
    if z > 1 {
        let _ = writeln!(
            w,
            "
@group(0) @binding(2) var<storage, read> src_bv: array<vec{z}<f32>>;

fn bv_at(i: i32, ok: bool) -> vec{z}<f32> {{
    return select(vec{z}<f32>(0.0), src_bv[u32(select(0, i, ok))], ok);
}}"
        );
    }
    let _ = writeln!(
        w,
        "
// Generated: kernel {k}, stride {s}, {m} A channels per lane, {v} B channels per tile, {r} rows,
// rows as vectors of {z}.
{head}",
        head = wgrad_entry("wgrad_sg", r)
    );
    let _ = writeln!(w, "    let la = lane % {la}u;\n    let lq = lane / {la}u;");
    for i in 0..m {
        let _ = writeln!(w, "    let ch{i} = ab * {}u + la + {}u;", la * m, la * i);
        let _ = writeln!(w, "    let chok{i} = ch{i} < p.ca;");
    }
    // This lane's first z of a step and, in vec4s, its first B value there.
    let _ = writeln!(w, "    let zl0 = lq * {zl}u;\n    let es0 = lq * {}u;", zl * s / 4);
    write_wgrad_sums(w, m, v, k3);
    let _ = writeln!(
        w,
        "    // (n, qx, qy0) of the row, stepped without divisions (slow per lane on software devices).
    var n = row0 / (p.ax * yblocks);
    var qx = (row0 / yblocks) % p.ax;
    var qy0 = (row0 % yblocks) * {r}u;
    for (var row = row0; row < row1; row++) {{
        let abase = p.a_base + n * p.a_batch + (qx * p.ay + qy0) * p.az;
        let bbase = i32(p.b_base + n * p.b_batch);
        let xi0 = i32(qx * {s}u) + p.off.x;
        let yi0 = i32(qy0 * {s}u) + p.off.y;
        for (var z0 = 0u; z0 < p.az; z0 += {zs}u) {{"
    );
    for rr in 0..r {
        for i in 0..m {
            let ok = format!("chok{i} && qy0 + {rr}u < p.ay");
            if z == 1 {
                for j in 0..8 {
                    let _ = writeln!(
                        w,
                        "            let x{i}_{rr}_{j} = a_at(abase + ch{i} * astride + p.az * {rr}u + z0 + {j}u, {ok} && z0 + {j}u < p.az);"
                    );
                }
            } else if z == 2 {
                // Rows of A at any alignment: 3 vec4 loads for 8 values, picked by the shift.
                let _ = writeln!(
                    w,
                    "            let ai{i}_{rr} = abase + ch{i} * astride + p.az * {rr}u + z0;
            let av{i}_{rr} = a8_at(ai{i}_{rr}, {ok});
            let sh{i}_{rr} = ai{i}_{rr} % 4u;"
                );
                for j in 0..8 {
                    let at = |d: usize| format!("av{i}_{rr}[{}].{}", (j + d) / 4, comp[(j + d) % 4]);
                    let _ = writeln!(
                        w,
                        "            let x{i}_{rr}_{j} = select(0.0, select(select(select({}, {}, sh{i}_{rr} == 1u), {}, sh{i}_{rr} == 2u), {}, sh{i}_{rr} == 3u), z0 + {j}u < p.az);",
                        at(0),
                        at(1),
                        at(2),
                        at(3)
                    );
                }
            } else {
                for c in 0..zl / 4 {
                    let _ = writeln!(
                        w,
                        "            let x{i}_{rr}_v{c} = a4_at((abase + ch{i} * astride + p.az * {rr}u + z0 + zl0) / 4u + {c}u, {ok} && z0 + zl0 + {}u < p.az);",
                        4 * c
                    );
                }
            }
        }
    }
    // The A value of lane channel i, row rr, z0 + zl0 + j.
    let xval = |i: usize, rr: usize, j: usize| {
        if z < 4 { format!("x{i}_{rr}_{j}") } else { format!("x{i}_{rr}_v{}.{}", j / 4, comp[j % 4]) }
    };
    for q in 0..nl {
        // Lane l reads the z values from element z (l + 8 q) of the step's span.
        let _ =
            writeln!(w, "            let zi{q} = i32(z0 * {s}u) + p.off.z + {z} * (i32(lane) + {});", 8 * q);
        let _ = writeln!(w, "            let zok{q} = zi{q} >= 0 && zi{q} < bz;");
    }
    for b in 0..v {
        for dx in 0..k {
            for yy in 0..brows {
                let _ = writeln!(
                    w,
                    "            {{
                let xi = xi0 + {dx};
                let yi = yi0 + {yy};
                let ok = bcok{b} && xi >= 0 && xi < bx && yi >= 0 && yi < by;
                let rb = bbase + i32(bc{b}) * bstride + (select(0, xi, ok) * by + select(0, yi, ok)) * bz;"
                );
                for q in 0..nl {
                    if z == 1 {
                        let _ = writeln!(w, "                let l{q} = b_at(rb + zi{q}, ok && zok{q});");
                    } else {
                        let _ = writeln!(
                            w,
                            "                let l{q} = bv_at((rb + zi{q}) / {z}, ok && zok{q});"
                        );
                    }
                }
                // The lane's B values: element e of its part of the span.
                for e in 0..(zl - 1) * s + k {
                    if z == 1 {
                        let _ = writeln!(
                            w,
                            "                let e{e} = subgroupShuffle(l{}, sb + {}u);",
                            e / 8,
                            e % 8
                        );
                    } else if lz == 1 {
                        let _ = writeln!(
                            w,
                            "                let e{e} = subgroupShuffle(l{}.{}, sb + {}u);",
                            e / (8 * z),
                            comp[e % z],
                            (e / z) % 8
                        );
                    } else {
                        let _ = writeln!(
                            w,
                            "                let e{e} = subgroupShuffle(l0.{}, sb + es0 + {}u);",
                            comp[e % 4],
                            e / 4
                        );
                    }
                }
                for rr in 0..r {
                    let Some(dy) = yy.checked_sub(rr * s).filter(|&d| d < k) else { continue };
                    for j in 0..zl {
                        for dz in 0..k {
                            let t = (dx * k + dy) * k + dz;
                            for i in 0..m {
                                let _ = writeln!(
                                    w,
                                    "                g{i}_{b}_{t} = fma({}, e{}, g{i}_{b}_{t});",
                                    xval(i, rr, j),
                                    j * s + dz
                                );
                            }
                        }
                    }
                }
                let _ = writeln!(w, "            }}");
            }
        }
    }
    write_wgrad_tail(w, r, m, v, k3, la);
    o
}

/// The opening of a weight-gradient kernel named `entry` over tiles of 8 lanes whose steps are
/// r rows along y: the tile's A and B channel blocks `ab`, `bb`, its chunk's steps `row0..row1`,
/// `yblocks` steps per (n, x), and the operands' extents.
fn wgrad_entry(entry: &str, r: usize) -> String {
    format!(
        "{}    let ab = t % p.ablocks;
    t /= p.ablocks;
    let bb = t % p.bblocks;
    let chunk = t / p.bblocks;
    let row0 = min(chunk * p.chunk_rows, p.rows);
    let row1 = min(row0 + p.chunk_rows, p.rows);
    let yblocks = (p.ay + {}u) / {r}u;
    let astride = p.ax * p.ay * p.az;
    let bx = i32(p.bx);
    let by = i32(p.by);
    let bz = i32(p.bz);
    let bstride = bx * by * bz;
",
        subgroup_entry(entry),
        r - 1
    )
}

/// A weight-gradient tile's v B channels (`bc{b}`, `bcok{b}` inside) and its partial sums
/// `g{i}_{b}_{t}` of m A channels x v B channels x k3 taps.
fn write_wgrad_sums(w: &mut String, m: usize, v: usize, k3: usize) {
    for b in 0..v {
        let _ = writeln!(w, "    let bc{b} = bb * {v}u + {b}u;\n    let bcok{b} = bc{b} < p.cb;");
    }
    for i in 0..m {
        for b in 0..v {
            for t in 0..k3 {
                let _ = writeln!(w, "    var g{i}_{b}_{t} = 0.0;");
            }
        }
    }
}

/// The end of a weight-gradient kernel's step loop (the next step r rows along y further) and
/// of the kernel: the partial sums `g{i}_{b}_{t}` of m A channels (`ch{i}`) x v B channels
/// (`bc{b}`) x k3 taps of lanes `la`, 2 `la`, ... apart (the same channels, other z) added up by
/// shuffles, and lane 0's (of each group of `la`) stored for the tile's chunk.
fn write_wgrad_tail(w: &mut String, r: usize, m: usize, v: usize, k3: usize, la: usize) {
    let _ = writeln!(
        w,
        "        }}
        qy0 += {r}u;
        let ywrap = qy0 >= p.ay;
        qy0 = select(qy0, 0u, ywrap);
        qx = select(qx, qx + 1u, ywrap);
        let xwrap = qx >= p.ax;
        qx = select(qx, 0u, xwrap);
        n = select(n, n + 1u, xwrap);
    }}"
    );
    let mut step = la;
    while step < 8 {
        for i in 0..m {
            for b in 0..v {
                for t in 0..k3 {
                    let _ = writeln!(w, "    g{i}_{b}_{t} += subgroupShuffleXor(g{i}_{b}_{t}, {step}u);");
                }
            }
        }
        step *= 2;
    }
    let _ = writeln!(w, "    if !live || lane >= {la}u {{\n        return;\n    }}");
    for i in 0..m {
        for b in 0..v {
            let _ = writeln!(w, "    if chok{i} && bcok{b} {{");
            for t in 0..k3 {
                let _ = writeln!(
                    w,
                    "        part[part_index(p.chunk0 + chunk, ch{i}, bc{b}, {t}u)] = g{i}_{b}_{t};"
                );
            }
            let _ = writeln!(w, "    }}");
        }
    }
    let _ = writeln!(w, "}}");
}

/// The opening of a subgroup tile kernel named `entry` over tiles of 8 lanes: each lane's `lane`
/// and subgroup base `sb`, and the tile's coordinates `zb`, `yb`, `{x}` (x), `cb` (channel block)
/// and `n` (sample), `live` false past the last tile (whose coordinates it then repeats); with
/// `classes` also its output parity class `cls`, which varies fastest.
fn tile_entry(entry: &str, x: &str, classes: bool) -> String {
    let cls = if classes {
        "    // Parity classes vary fastest: the tiles of a workgroup then fill the same output lines.
    let cls = t % p.ncls;
    t /= p.ncls;
"
    } else {
        ""
    };
    format!(
        "{}{cls}    let zb = t % p.zblocks;
    t /= p.zblocks;
    let yb = t % p.yblocks;
    t /= p.yblocks;
    let {x} = t % p.xblocks;
    t /= p.xblocks;
    let cb = t % p.cblocks;
    let n = t / p.cblocks;
",
        subgroup_entry(entry)
    )
}

/// The opening of a subgroup kernel named `entry` whose tiles are 8 lanes: each lane's `lane` and
/// subgroup base `sb`, the tile's index `t` (clamped to the last tile) and `live`, false past it.
fn subgroup_entry(entry: &str) -> String {
    format!(
        "@compute @workgroup_size(64)
fn {entry}(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) sid: u32,
) {{
    let lane = sid & 7u;
    let sb = sid - lane;
    var t = (wg.x + wg.y * nw.x) * 8u + li / 8u;
    let live = t < p.tiles;
    t = min(t, p.tiles - 1u);
"
    )
}

/// Tap `t`'s weights `k{a}` of the tile's m channels, shuffled out of the vec4s `w{c}` in which
/// lane l holds vec4 l + 8 c of the block (channel a's 8 taps are vec4s 2 a and 2 a + 1).
fn write_tap_weights(w: &mut String, m: usize, t: usize) {
    let comp = ["x", "y", "z", "w"];
    for a in 0..m {
        let c = 2 * a + t / 4;
        let _ = writeln!(
            w,
            "            let k{a} = subgroupShuffle(w{}.{}, sb + {}u);",
            c / 8,
            comp[t % 4],
            c % 8
        );
    }
}

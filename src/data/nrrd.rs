//! A small NRRD reader: attached data, `raw`, `gzip` and `ascii` encodings, the integer and
//! floating types, either endianness, and geometry from `space directions` / `spacings` /
//! `space origin`. The challenge's LA files (`lgemri.nrrd`, `laendo.nrrd`) are gzip-encoded
//! unsigned char volumes in left-posterior-superior space.
//!
//! NRRD stores the first axis fastest, like NIfTI; the volume comes back X-major with Z
//! fastest. The geometry is turned into a NIfTI header (RAS sform) so that files written from
//! it line up with the source in a viewer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use flate2::read::MultiGzDecoder;
use nifti::NiftiHeader;

use super::volume::{Geometry, Image, Volume};

const MAX_HEADER_BYTES: usize = 1 << 16;
const MAX_VOXELS: usize = 1 << 30;
/// The largest expansion of a deflate stream (RFC 1951 blocks of 258-byte matches).
const MAX_DEFLATE_RATIO: u64 = 1032;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "signed char" | "int8" | "int8_t" => Ty::I8,
            "uchar" | "unsigned char" | "uint8" | "uint8_t" => Ty::U8,
            "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => Ty::I16,
            "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Ty::U16,
            "int" | "signed int" | "int32" | "int32_t" => Ty::I32,
            "uint" | "unsigned int" | "uint32" | "uint32_t" => Ty::U32,
            "longlong"
            | "long long"
            | "long long int"
            | "signed long long"
            | "signed long long int"
            | "int64"
            | "int64_t" => Ty::I64,
            "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => Ty::U64,
            "float" => Ty::F32,
            "double" => Ty::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Ty::I8 | Ty::U8 => 1,
            Ty::I16 | Ty::U16 => 2,
            Ty::I32 | Ty::U32 | Ty::F32 => 4,
            Ty::I64 | Ty::U64 | Ty::F64 => 8,
        }
    }

    fn decode(self, c: &[u8], big: bool) -> f64 {
        macro_rules! num {
            ($t:ty) => {{
                let b = c.try_into().expect("chunk size matches the type");
                (if big { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }) as f64
            }};
        }
        match self {
            Ty::I8 => c[0] as i8 as f64,
            Ty::U8 => c[0] as f64,
            Ty::I16 => num!(i16),
            Ty::U16 => num!(u16),
            Ty::I32 => num!(i32),
            Ty::U32 => num!(u32),
            Ty::I64 => num!(i64),
            Ty::U64 => num!(u64),
            Ty::F32 => num!(f32),
            Ty::F64 => num!(f64),
        }
    }
}

/// Reads a 3D NRRD volume as f32, with its geometry.
pub fn read_nrrd(path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    read_impl(path).with_context(|| format!("reading NRRD {}", path.display()))
}

fn parse_vector(s: &str) -> Result<Option<[f64; 3]>> {
    let s = s.trim();
    if s == "none" {
        return Ok(None);
    }
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .with_context(|| format!("vector {s:?} is not of the form (a,b,c)"))?;
    let v: Vec<f64> = inner
        .split(',')
        .map(|t| t.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("vector {s:?} has a non-numeric component"))?;
    ensure!(v.len() == 3, "vector {s:?} needs 3 components (3D space)");
    ensure!(v.iter().all(|c| c.is_finite()), "vector {s:?} has a component that is not a finite number");
    Ok(Some([v[0], v[1], v[2]]))
}

/// Splits "(a,b,c) (d,e,f) none" into its vectors.
fn split_vectors(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0;
    for ch in s.chars() {
        match ch {
            '(' => {
                depth += 1;
                cur.push(ch)
            }
            ')' => {
                depth -= 1;
                cur.push(ch)
            }
            c if c.is_whitespace() && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn read_impl(path: &Path) -> Result<Image> {
    let file_len = std::fs::metadata(path).context("cannot open")?.len();
    let mut r = BufReader::new(File::open(path).context("cannot open")?);
    let mut first = String::new();
    (&mut r).take(MAX_HEADER_BYTES as u64).read_line(&mut first).context("reading the first line")?;
    ensure!(
        first.starts_with("NRRD000"),
        "not a NRRD file (first line {:?}, expected NRRD000x)",
        first.trim_end()
    );
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut header_len = first.len();
    loop {
        let mut line = String::new();
        let room = (MAX_HEADER_BYTES + 1).saturating_sub(header_len) as u64;
        let n = (&mut r).take(room).read_line(&mut line).context("reading the header")?;
        ensure!(n > 0, "the header has no blank line before the data");
        header_len += n;
        ensure!(header_len <= MAX_HEADER_BYTES, "the header exceeds {MAX_HEADER_BYTES} bytes");
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            break;
        }
        if line.starts_with('#') || line.contains(":=") {
            continue;
        }
        let (k, v) = line.split_once(": ").with_context(|| format!("malformed header line {line:?}"))?;
        fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let get =
        |k: &str| fields.get(k).map(String::as_str).with_context(|| format!("the header has no {k:?} field"));
    if fields.contains_key("data file") || fields.contains_key("datafile") {
        bail!("detached data files are not supported");
    }
    let ty_s = get("type")?;
    let ty = Ty::parse(ty_s).with_context(|| format!("unsupported type {ty_s:?}"))?;
    let dim: usize = get("dimension")?.parse().context("the dimension field is not an integer")?;
    ensure!(dim == 3, "dimension {dim}: only 3D volumes are supported");
    let sizes: Vec<usize> = get("sizes")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("the sizes field is not a list of integers")?;
    ensure!(sizes.len() == 3 && sizes.iter().all(|&s| s > 0), "sizes {sizes:?} must be 3 positive integers");
    let dims = [sizes[0], sizes[1], sizes[2]];
    let n = dims
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&n| n <= MAX_VOXELS)
        .with_context(|| format!("sizes {dims:?} are implausibly large"))?;
    let nbytes = n * ty.size();
    let encoding = get("encoding")?;
    let text = matches!(encoding, "ascii" | "text" | "txt");
    let big = match fields.get("endian").map(String::as_str) {
        Some("big") => true,
        Some("little") => false,
        // Byte order matters only for binary data of multi-byte types.
        None if ty.size() == 1 || text => false,
        None => bail!("multi-byte type {ty_s:?} without an endian field"),
        Some(e) => bail!("unknown endian {e:?}"),
    };
    let byte_skip: u64 = match fields.get("byte skip") {
        None => 0,
        Some(s) => s.parse().with_context(|| format!("byte skip {s:?} is not a non-negative integer"))?,
    };

    // File order is x fastest; values go straight to their place in the volume layout. The
    // volume is allocated only once the file is known to hold that many values.
    let [nx, ny, nz] = dims;
    let place = |i: usize| {
        let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
        (x * ny + y) * nz + z
    };
    let data_len = file_len.saturating_sub(header_len as u64);
    let mut data;
    match encoding {
        "raw" | "gzip" | "gz" => {
            let gz = encoding != "raw";
            let need = byte_skip.saturating_add(nbytes as u64);
            if gz {
                // Deflate expands at most 1032-fold.
                ensure!(
                    need <= data_len.saturating_mul(MAX_DEFLATE_RATIO),
                    "truncated: sizes {dims:?} of {ty_s} need {need} bytes of data, more than \
                     {data_len} compressed bytes can hold"
                );
            } else {
                ensure!(
                    data_len >= need,
                    "truncated: sizes {dims:?} of {ty_s} need {need} bytes of data after the \
                     {header_len}-byte header, the file has {data_len}"
                );
            }
            let mut src: Box<dyn Read> = if gz { Box::new(MultiGzDecoder::new(r)) } else { Box::new(r) };
            let wrap = |e: io::Error| {
                if gz { anyhow::anyhow!("corrupt or truncated gzip data: {e}") } else { e.into() }
            };
            io::copy(&mut (&mut src).take(byte_skip), &mut io::sink()).map_err(wrap)?;
            // For gzip the buffer grows with the data actually present.
            let mut raw = if gz { Vec::new() } else { Vec::with_capacity(nbytes) };
            (&mut src).take(nbytes as u64).read_to_end(&mut raw).map_err(wrap)?;
            ensure!(
                raw.len() == nbytes,
                "truncated: sizes {dims:?} of {ty_s} need {nbytes} bytes of data, found {}",
                raw.len()
            );
            data = vec![0f32; n];
            for (i, c) in raw.chunks_exact(ty.size()).enumerate() {
                data[place(i)] = ty.decode(c, big) as f32;
            }
        }
        "ascii" | "text" | "txt" => {
            // Every value but the last takes a digit and a separator.
            ensure!(
                (n as u64).saturating_mul(2) <= data_len + 1,
                "truncated: sizes {dims:?} need {n} values, more than {data_len} bytes of text can hold"
            );
            data = vec![0f32; n];
            let mut s = String::new();
            r.read_to_string(&mut s).context("ascii data is not text")?;
            let mut count = 0;
            for (i, t) in s.split_whitespace().take(n).enumerate() {
                let v: f64 =
                    t.parse().with_context(|| format!("ascii data holds a non-numeric value {t:?}"))?;
                data[place(i)] = v as f32;
                count += 1;
            }
            ensure!(count == n, "truncated: sizes {dims:?} need {n} values, found {count}");
        }
        e => bail!("unsupported encoding {e:?} (raw, gzip and ascii are)"),
    }
    let geometry = geometry(&fields)?;
    Ok(Volume::from_vec(dims, data)?.with_geometry(geometry))
}

/// Spacing from `space directions` (vector norms) or `spacings`; a NIfTI header whose sform
/// maps voxels to RAS millimetres when the space is known.
fn geometry(fields: &HashMap<String, String>) -> Result<Geometry> {
    let mut spacing = [1f32; 3];
    let mut dirs: Option<[[f64; 3]; 3]> = None;
    if let Some(s) = fields.get("space directions") {
        let v = split_vectors(s);
        ensure!(v.len() == 3, "space directions {s:?} must list 3 vectors for a 3D volume");
        let mut d = [[0.0; 3]; 3];
        let mut all = true;
        for (a, t) in v.iter().enumerate() {
            match parse_vector(t)? {
                Some(vec) => {
                    d[a] = vec;
                    let norm = vec.iter().map(|c| c * c).sum::<f64>().sqrt();
                    if norm > 0.0 && (norm as f32).is_finite() {
                        spacing[a] = norm as f32;
                    }
                }
                None => all = false,
            }
        }
        if all {
            dirs = Some(d);
        }
    } else if let Some(s) = fields.get("spacings") {
        let v: Vec<&str> = s.split_whitespace().collect();
        ensure!(v.len() == 3, "spacings {s:?} must list 3 values");
        for (a, t) in v.iter().enumerate() {
            if let Ok(x) = t.parse::<f64>()
                && x > 0.0
                && (x as f32).is_finite()
                && x as f32 > 0.0
            {
                spacing[a] = x as f32;
            }
        }
    }
    let origin = match fields.get("space origin") {
        Some(s) => parse_vector(s)?.unwrap_or([0.0; 3]),
        None => [0.0; 3],
    };
    // Sign flips from the NRRD space to RAS, per world axis.
    let to_ras = match fields.get("space").map(String::as_str) {
        Some("left-posterior-superior" | "LPS") => Some([-1.0, -1.0, 1.0]),
        Some("right-anterior-superior" | "RAS") => Some([1.0, 1.0, 1.0]),
        Some("left-anterior-superior" | "LAS") => Some([-1.0, 1.0, 1.0]),
        _ => None,
    };
    let [sx, sy, sz] = spacing;
    let mut h = NiftiHeader {
        pixdim: [1.0, sx, sy, sz, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2,
        srow_x: [sx, 0.0, 0.0, 0.0],
        srow_y: [0.0, sy, 0.0, 0.0],
        srow_z: [0.0, 0.0, sz, 0.0],
        ..NiftiHeader::default()
    };
    if let (Some(d), Some(f)) = (dirs, to_ras) {
        // World row i, voxel axis a: d[a][i] (the a-th direction's i-th component).
        let row = |i: usize| {
            [
                (f[i] * d[0][i]) as f32,
                (f[i] * d[1][i]) as f32,
                (f[i] * d[2][i]) as f32,
                (f[i] * origin[i]) as f32,
            ]
        };
        h.srow_x = row(0);
        h.srow_y = row(1);
        h.srow_z = row(2);
        h.sform_code = 1;
    } else {
        h.sform_code = 0;
    }
    Ok(Geometry { spacing, header: Some(Box::new(h)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    /// A fresh folder, removed when the `TempDir` is dropped: keep it bound for the test.
    fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::Builder::new().prefix(&format!("caml-nrrd-{tag}-")).tempdir().unwrap();
        let d = t.path().to_path_buf();
        (t, d)
    }

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = header.as_bytes().to_vec();
        b.extend_from_slice(data);
        b
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// Values 100x + 10y + z in file order (x fastest).
    fn values() -> Vec<i16> {
        let mut v = Vec::new();
        for z in 0..4 {
            for y in 0..3 {
                for x in 0..2 {
                    v.push(100 * x + 10 * y + z);
                }
            }
        }
        v
    }

    fn check(v: &Image) {
        assert_eq!(v.dims(), [2, 3, 4]);
        for x in 0..2 {
            for y in 0..3 {
                for z in 0..4 {
                    assert_eq!(v.get(x, y, z), (100 * x + 10 * y + z) as f32);
                }
            }
        }
    }

    #[test]
    fn reads_raw_gzip_ascii_both_endians_with_geometry() {
        let (_d, d) = tmpdir("ok");
        let le: Vec<u8> = values().iter().flat_map(|v| v.to_le_bytes()).collect();
        let be: Vec<u8> = values().iter().flat_map(|v| v.to_be_bytes()).collect();
        let head = |enc: &str, endian: &str| {
            format!(
                "NRRD0004\n# a comment\ntype: short\ndimension: 3\nspace: left-posterior-superior\n\
                 sizes: 2 3 4\nspace directions: (0.625,0,0) (0,0.625,0) (0,0,2.5)\n\
                 kinds: domain domain domain\nendian: {endian}\nencoding: {enc}\n\
                 space origin: (10,20,30)\n\n"
            )
        };
        let ascii: String = values().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" ");
        let cases = [
            ("raw_le.nrrd", file(&head("raw", "little"), &le)),
            ("raw_be.nrrd", file(&head("raw", "big"), &be)),
            ("gz.nrrd", file(&head("gzip", "little"), &gzip(&le))),
            ("ascii.nrrd", file(&head("ascii", "little"), ascii.as_bytes())),
        ];
        for (name, bytes) in cases {
            let p = d.join(name);
            std::fs::write(&p, bytes).unwrap();
            let v = read_nrrd(&p).unwrap();
            check(&v);
            assert_eq!(v.geometry.spacing, [0.625, 0.625, 2.5]);
            let h = v.geometry.header.as_ref().unwrap();
            assert_eq!(h.sform_code, 1);
            assert_eq!(h.srow_x, [-0.625, 0.0, 0.0, -10.0]);
            assert_eq!(h.srow_y, [0.0, -0.625, 0.0, -20.0]);
            assert_eq!(h.srow_z, [0.0, 0.0, 2.5, 30.0]);
        }
        // CRLF line ends, uchar without endian, spacings instead of directions.
        let p = d.join("u8.nrrd");
        let u8s: Vec<u8> = values().iter().map(|&v| v as u8).collect();
        let h = "NRRD0001\r\ntype: uchar\r\ndimension: 3\r\nsizes: 2 3 4\r\nspacings: 1.5 2 3\r\n\
                 encoding: raw\r\n\r\n";
        std::fs::write(&p, file(h, &u8s)).unwrap();
        let v = read_nrrd(&p).unwrap();
        check(&v);
        assert_eq!(v.geometry.spacing, [1.5, 2.0, 3.0]);
    }

    #[test]
    fn every_type_decodes() {
        let (_d, d) = tmpdir("types");
        let vals = [0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let enc: Vec<(&str, Vec<u8>)> = vec![
            ("uchar", vals.iter().map(|&v| v as u8).collect()),
            ("signed char", vals.iter().map(|&v| v as i8 as u8).collect()),
            ("short", vals.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect()),
            ("ushort", vals.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect()),
            ("int", vals.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()),
            ("uint", vals.iter().flat_map(|&v| (v as u32).to_le_bytes()).collect()),
            ("float", vals.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()),
            ("double", vals.iter().flat_map(|&v| v.to_le_bytes()).collect()),
        ];
        for (ty, data) in enc {
            let p = d.join("t.nrrd");
            let h = format!(
                "NRRD0004\ntype: {ty}\ndimension: 3\nsizes: 2 2 2\nendian: little\nencoding: raw\n\n"
            );
            std::fs::write(&p, file(&h, &data)).unwrap();
            let v = read_nrrd(&p).unwrap();
            // File order x fastest: value 1 is (1,0,0), 2 is (0,1,0), 4 is (0,0,1).
            assert_eq!(v.get(1, 0, 0), 1.0, "{ty}");
            assert_eq!(v.get(0, 1, 0), 2.0, "{ty}");
            assert_eq!(v.get(0, 0, 1), 4.0, "{ty}");
            assert_eq!(v.get(1, 1, 1), 7.0, "{ty}");
        }
    }

    #[test]
    fn malformed_files_give_errors_naming_them() {
        let (_d, d) = tmpdir("bad");
        let le: Vec<u8> = values().iter().flat_map(|v| v.to_le_bytes()).collect();
        let ok = "NRRD0004\ntype: short\ndimension: 3\nsizes: 2 3 4\nendian: little\nencoding: raw\n\n";
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("magic.nrrd", file("P5\n\n", &le), "not a NRRD"),
            ("notype.nrrd", file(&ok.replace("type: short\n", ""), &le), "\"type\""),
            ("badtype.nrrd", file(&ok.replace("short", "complex"), &le), "unsupported type"),
            ("dim2.nrrd", file(&ok.replace("dimension: 3", "dimension: 2"), &le), "only 3D"),
            ("sizes.nrrd", file(&ok.replace("2 3 4", "2 x 4"), &le), "sizes"),
            ("noendian.nrrd", file(&ok.replace("endian: little\n", ""), &le), "endian"),
            ("enc.nrrd", file(&ok.replace("raw", "bzip2"), &le), "unsupported encoding"),
            ("trunc.nrrd", file(ok, &le[..20]), "truncated"),
            ("truncgz.nrrd", file(&ok.replace("raw", "gzip"), &gzip(&le)[..15]), "gzip"),
            ("shortgz.nrrd", file(&ok.replace("raw", "gzip"), &gzip(&le[..30])), "truncated"),
            ("noblank.nrrd", b"NRRD0004\ntype: short\n".to_vec(), "blank line"),
            ("line.nrrd", file(&ok.replace("encoding: raw", "encoding raw"), &le), "malformed header line"),
            (
                "detached.nrrd",
                file(&ok.replace("encoding: raw\n", "encoding: raw\ndata file: x.raw\n"), &le),
                "detached",
            ),
            (
                "dirs.nrrd",
                file(
                    &ok.replace(
                        "encoding: raw\n",
                        "encoding: raw\nspace directions: (1,0) (0,1,0) (0,0,1)\n",
                    ),
                    &le,
                ),
                "3 components",
            ),
        ];
        for (name, bytes, want) in cases {
            let p = d.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", read_nrrd(&p).unwrap_err());
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
    }
}

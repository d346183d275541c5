//! NIfTI-1 (.nii, .nii.gz) reading and writing.
//!
//! The header is parsed by the `nifti` crate; the voxel data are read here so that the declared
//! size is checked against the file before anything that large is allocated, and so that a
//! truncated or corrupt file gives an error naming it. NIfTI stores x fastest (Fortran order);
//! volumes are X-major with Z fastest, and the conversion happens in this module only.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use flate2::read::MultiGzDecoder;
use nifti::{Endianness, NiftiHeader, NiftiType};

use super::volume::{Geometry, Image, Mask, Volume};

/// Volumes larger than this many voxels are rejected as corrupt dims.
const MAX_VOXELS: usize = 1 << 30;
const HEADER_BYTES: u64 = 348;
/// The largest expansion of a deflate stream (RFC 1951 blocks of 258-byte matches).
const MAX_DEFLATE_RATIO: u64 = 1032;

pub fn read_image(path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    read_as(path, |v| v as f32).with_context(|| format!("reading NIfTI image {}", path.display()))
}

/// Reads a label map; every voxel must be an integer in 0..=255 after scaling.
pub fn read_mask(path: impl AsRef<Path>) -> Result<Mask> {
    let path = path.as_ref();
    let f = read_as(path, |v| v).with_context(|| format!("reading NIfTI mask {}", path.display()))?;
    let bad = f.data().iter().filter(|&&v| !(v.fract() == 0.0 && (0.0..=255.0).contains(&v))).count();
    if bad > 0 {
        bail!("NIfTI mask {}: {bad} voxels are not integers in 0..=255", path.display());
    }
    Ok(f.map(|v| v as u8))
}

/// The header and voxel count of a file, without reading its data.
pub fn read_header(path: impl AsRef<Path>) -> Result<NiftiHeader> {
    let path = path.as_ref();
    let (_, h) = open_header(path).with_context(|| format!("reading NIfTI header {}", path.display()))?;
    Ok(h)
}

fn open_header(path: &Path) -> Result<(Box<dyn Read>, NiftiHeader)> {
    let mut f = File::open(path).context("cannot open")?;
    let mut magic = [0u8; 2];
    let gz = f.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
    drop(f);
    let f = BufReader::new(File::open(path).context("cannot open")?);
    let mut r: Box<dyn Read> = if gz { Box::new(MultiGzDecoder::new(f)) } else { Box::new(f) };
    let h = NiftiHeader::from_reader(&mut r).map_err(|e| match e {
        nifti::NiftiError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            anyhow::anyhow!("file ends inside the 348-byte header")
        }
        nifti::NiftiError::Io(e) if gz => {
            anyhow::anyhow!("corrupt gzip stream in the header: {e}")
        }
        e => anyhow::anyhow!("invalid header: {e}"),
    })?;
    if h.sizeof_hdr == 540 || h.sizeof_hdr.swap_bytes() == 540 {
        bail!("NIfTI-2 files are not supported (sizeof_hdr 540)");
    }
    ensure!(h.sizeof_hdr == 348, "not a NIfTI-1 file (sizeof_hdr is {}, expected 348)", h.sizeof_hdr);
    match &h.magic {
        b"n+1\0" => {}
        b"ni1\0" => bail!("header/image pairs (.hdr/.img) are not supported; convert to .nii"),
        m => bail!("bad NIfTI magic {m:?} (expected \"n+1\\0\")"),
    }
    Ok((r, h))
}

/// Spatial dims (x, y, z) from a header; higher dims must be 1.
fn spatial_dims(h: &NiftiHeader) -> Result<[usize; 3]> {
    let nd = h.dim[0] as i16;
    ensure!((1..=7).contains(&nd), "dim[0] = {nd} is not a dimensionality in 1..=7");
    let mut d = [1usize; 3];
    for k in 1..=nd as usize {
        let v = h.dim[k] as i16;
        ensure!(v >= 1, "dim[{k}] = {v} is not a positive size");
        if k <= 3 {
            d[k - 1] = v as usize;
        } else {
            ensure!(v == 1, "dim[{k}] = {v}: only single 3D volumes are supported");
        }
    }
    let n = d.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    ensure!(n.is_some_and(|n| n <= MAX_VOXELS), "dims {d:?} are implausibly large");
    Ok(d)
}

fn spacing(h: &NiftiHeader) -> [f32; 3] {
    // xyzt_units: 1 = metre, 2 = millimetre, 3 = micron; unknown means millimetre.
    let scale = match h.xyzt_units & 0x07 {
        1 => 1000.0,
        3 => 0.001,
        _ => 1.0,
    };
    [1, 2, 3].map(|k| {
        let p = h.pixdim[k].abs() * scale;
        if p.is_finite() && p > 0.0 { p } else { 1.0 }
    })
}

fn read_as<T: Copy + Default>(path: &Path, convert: impl Fn(f64) -> T) -> Result<Volume<T>> {
    let (mut r, h) = open_header(path)?;
    let dims = spatial_dims(&h)?;
    let dtype = h.data_type().ok();
    let elem = match dtype {
        Some(NiftiType::Uint8 | NiftiType::Int8) => 1,
        Some(NiftiType::Int16 | NiftiType::Uint16) => 2,
        Some(NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32) => 4,
        Some(NiftiType::Float64) => 8,
        _ => bail!(
            "unsupported voxel type (datatype code {}); supported: uint8, int8, int16, uint16, \
             int32, uint32, float32, float64",
            h.datatype
        ),
    };
    let dtype = dtype.unwrap_or(NiftiType::Uint8);
    let n: usize = dims.iter().product();
    let nbytes = n * elem;
    ensure!(
        h.vox_offset.is_finite() && h.vox_offset >= HEADER_BYTES as f32,
        "vox_offset {} lies inside the header",
        h.vox_offset
    );
    let skip = h.vox_offset as u64 - HEADER_BYTES;
    let gz = is_gzip(path)?;
    let len = std::fs::metadata(path)?.len();
    let need = (h.vox_offset as u64).saturating_add(nbytes as u64);
    if gz {
        // Deflate expands at most 1032-fold.
        ensure!(
            need <= len.saturating_mul(MAX_DEFLATE_RATIO),
            "truncated: dims {dims:?} of {elem}-byte voxels need {need} bytes, more than a \
             {len}-byte gzip file can hold"
        );
    } else {
        ensure!(
            len >= need,
            "truncated: dims {dims:?} of {elem}-byte voxels need {need} bytes, the file has {len}"
        );
    }
    let skipped = io::copy(&mut (&mut r).take(skip), &mut io::sink()).map_err(|e| gz_error(e, gz))?;
    ensure!(skipped == skip, "truncated: the file ends before vox_offset");
    // For gzip the decoded size is unknown until read: the buffer grows with the data actually
    // present rather than being sized from the header.
    let mut raw = if gz { Vec::new() } else { Vec::with_capacity(nbytes) };
    (&mut r).take(nbytes as u64).read_to_end(&mut raw).map_err(|e| gz_error(e, gz))?;
    ensure!(
        raw.len() == nbytes,
        "truncated: dims {dims:?} of {elem}-byte voxels need {nbytes} bytes of data, the file holds {}",
        raw.len()
    );

    let big = h.endianness == Endianness::Big;
    let (slope, inter) = if h.scl_slope != 0.0 && h.scl_slope.is_finite() && h.scl_inter.is_finite() {
        (h.scl_slope as f64, h.scl_inter as f64)
    } else {
        (1.0, 0.0)
    };
    let value = |c: &[u8]| -> f64 {
        macro_rules! num {
            ($t:ty) => {{
                let b = c.try_into().expect("chunk size matches the type");
                if big { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }
            }};
        }
        match dtype {
            NiftiType::Uint8 => c[0] as f64,
            NiftiType::Int8 => c[0] as i8 as f64,
            NiftiType::Int16 => num!(i16) as f64,
            NiftiType::Uint16 => num!(u16) as f64,
            NiftiType::Int32 => num!(i32) as f64,
            NiftiType::Uint32 => num!(u32) as f64,
            NiftiType::Float32 => num!(f32) as f64,
            _ => num!(f64),
        }
    };
    let [nx, ny, nz] = dims;
    let mut data = vec![T::default(); n];
    let mut chunks = raw.chunks_exact(elem);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let c = chunks.next().expect("raw holds n voxels");
                data[(x * ny + y) * nz + z] = convert(value(c) * slope + inter);
            }
        }
    }
    let geometry = Geometry { spacing: spacing(&h), header: Some(Box::new(h)) };
    Ok(Volume::from_vec(dims, data)?.with_geometry(geometry))
}

fn is_gzip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 2];
    let mut f = File::open(path)?;
    Ok(f.read(&mut magic)? == 2 && magic == [0x1f, 0x8b])
}

fn gz_error(e: io::Error, gz: bool) -> anyhow::Error {
    if gz { anyhow::anyhow!("corrupt or truncated gzip stream: {e}") } else { anyhow::Error::new(e) }
}

/// The header written for a volume: its own (read from disk) or one built from its spacing,
/// with fields that describe the old data (scaling, display range, intent) reset.
fn output_header(g: &Geometry) -> NiftiHeader {
    let mut h = match &g.header {
        Some(h) => (**h).clone(),
        None => {
            let [sx, sy, sz] = g.spacing;
            NiftiHeader {
                pixdim: [1.0, sx, sy, sz, 1.0, 1.0, 1.0, 1.0],
                qform_code: 2,
                sform_code: 2,
                srow_x: [sx, 0.0, 0.0, 0.0],
                srow_y: [0.0, sy, 0.0, 0.0],
                srow_z: [0.0, 0.0, sz, 0.0],
                xyzt_units: 2,
                ..NiftiHeader::default()
            }
        }
    };
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    h.glmin = 0;
    h.glmax = 0;
    h.intent_code = 0;
    h.intent_p1 = 0.0;
    h.intent_p2 = 0.0;
    h.intent_p3 = 0.0;
    h.intent_name = [0; 16];
    h
}

/// Writes a u8 mask with the volume's header, atomically (temporary file, then rename).
pub fn write_mask(path: impl AsRef<Path>, m: &Mask) -> Result<()> {
    write_as(path.as_ref(), m)
}

/// Writes an f32 image (e.g. probabilities) with the volume's header, atomically.
pub fn write_image(path: impl AsRef<Path>, v: &Image) -> Result<()> {
    write_as(path.as_ref(), v)
}

fn write_as<T>(path: &Path, v: &Volume<T>) -> Result<()>
where
    T: Copy + nifti::DataElement + bytemuck::Pod,
{
    let tmp = temp_path(path)?;
    let res = (|| -> Result<()> {
        let h = output_header(&v.geometry);
        let arr = ndarray::ArrayView3::from_shape(v.dims(), v.data())?;
        nifti::writer::WriterOptions::new(&tmp).reference_header(&h).write_nifti(&arr).map_err(
            |e| match e {
                // The OS error itself ("No such file or directory"), not its debug form.
                nifti::NiftiError::Io(e) => anyhow::Error::from(e),
                e => anyhow::Error::from(e),
            },
        )?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing NIfTI {}", path.display()))
}

/// A hidden file in the destination's folder, with the same NIfTI extension, so that the final
/// rename is atomic and the writer picks the same compression.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let ext = if name.ends_with(".nii.gz") {
        ".nii.gz"
    } else if name.ends_with(".nii") {
        ".nii"
    } else {
        bail!("{}: a NIfTI output must end in .nii or .nii.gz", path.display());
    };
    // The writer derives its output name by replacing the last extension, so the stem must not
    // contain dots of its own.
    let stem = name[..name.len() - ext.len()].replace('.', "_");
    Ok(path.with_file_name(format!(".{stem}-{}-tmp{ext}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fresh folder, removed when the `TempDir` is dropped: keep it bound for the test.
    fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::Builder::new().prefix(&format!("caml-nifti-{tag}-")).tempdir().unwrap();
        let d = t.path().to_path_buf();
        (t, d)
    }

    /// A single-file NIfTI-1 written byte by byte from the specification's offsets.
    fn raw_nifti(
        dims: [i16; 3],
        datatype: i16,
        bitpix: i16,
        slope: f32,
        inter: f32,
        data: &[u8],
        big: bool,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let put = |h: &mut Vec<u8>, off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
        macro_rules! enc {
            ($v:expr) => {
                if big { $v.to_be_bytes() } else { $v.to_le_bytes() }
            };
        }
        put(&mut h, 0, &enc!(348i32));
        let dim = [3i16, dims[0], dims[1], dims[2], 1, 1, 1, 1];
        for (k, d) in dim.iter().enumerate() {
            put(&mut h, 40 + 2 * k, &enc!(*d));
        }
        put(&mut h, 70, &enc!(datatype));
        put(&mut h, 72, &enc!(bitpix));
        let pixdim = [1.0f32, 0.7, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0];
        for (k, p) in pixdim.iter().enumerate() {
            put(&mut h, 76 + 4 * k, &enc!(*p));
        }
        put(&mut h, 108, &enc!(352f32));
        put(&mut h, 112, &enc!(slope));
        put(&mut h, 116, &enc!(inter));
        put(&mut h, 344, b"n+1\0");
        h.extend_from_slice(data);
        h
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_fortran_order_int16_with_scaling_both_endians_and_gzip() {
        let (_d, d) = tmpdir("i16");
        let dims = [3usize, 4, 5];
        // File order: x fastest; the stored value encodes its (x, y, z).
        let mut le = Vec::new();
        let mut be = Vec::new();
        for z in 0..5 {
            for y in 0..4 {
                for x in 0..3 {
                    let v = (100 * x + 10 * y + z) as i16;
                    le.extend_from_slice(&v.to_le_bytes());
                    be.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        let files = [
            ("le.nii", raw_nifti([3, 4, 5], 4, 16, 2.0, 1.0, &le, false)),
            ("be.nii", raw_nifti([3, 4, 5], 4, 16, 2.0, 1.0, &be, true)),
            ("le.nii.gz", gzip(&raw_nifti([3, 4, 5], 4, 16, 2.0, 1.0, &le, false))),
        ];
        for (name, bytes) in files {
            let p = d.join(name);
            std::fs::write(&p, bytes).unwrap();
            let v = read_image(&p).unwrap();
            assert_eq!(v.dims(), dims);
            assert_eq!(v.geometry.spacing, [0.7, 0.8, 2.5]);
            for x in 0..3 {
                for y in 0..4 {
                    for z in 0..5 {
                        let want = 2.0 * (100 * x + 10 * y + z) as f32 + 1.0;
                        assert_eq!(v.get(x, y, z), want, "{name} at {x},{y},{z}");
                    }
                }
            }
        }
    }

    #[test]
    fn reads_every_supported_type() {
        let (_d, d) = tmpdir("types");
        let vals = [0.0f64, 1.0, 7.0, 100.0];
        let cases: Vec<(i16, i16, Vec<u8>)> = vec![
            (2, 8, vals.iter().map(|&v| v as u8).collect()),
            (4, 16, vals.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect()),
            (8, 32, vals.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()),
            (16, 32, vals.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()),
            (64, 64, vals.iter().flat_map(|&v| v.to_le_bytes()).collect()),
        ];
        for (dt, bp, data) in cases {
            let p = d.join(format!("t{dt}.nii"));
            std::fs::write(&p, raw_nifti([2, 2, 1], dt, bp, 0.0, 0.0, &data, false)).unwrap();
            let v = read_image(&p).unwrap();
            // File order x fastest: (0,0) (1,0) (0,1) (1,1).
            assert_eq!(v.data(), &[0.0, 7.0, 1.0, 100.0], "datatype {dt}");
            let m = read_mask(&p).unwrap();
            assert_eq!(m.data(), &[0, 7, 1, 100]);
        }
    }

    #[test]
    fn round_trip_keeps_values_order_and_header() {
        let (_d, d) = tmpdir("rt");
        let src = raw_nifti([2, 3, 4], 2, 8, 0.0, 0.0, &[0u8; 24], false);
        let mut hdr_file = src.clone();
        // Give the source a distinctive affine.
        hdr_file[280..292]
            .copy_from_slice(&[0.7f32, 0.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        hdr_file[252..254].copy_from_slice(&1i16.to_le_bytes()); // qform_code
        hdr_file[254..256].copy_from_slice(&1i16.to_le_bytes()); // sform_code
        hdr_file[292..296].copy_from_slice(&(-12.5f32).to_le_bytes()); // srow_x[3]
        let p = d.join("src.nii");
        std::fs::write(&p, &hdr_file).unwrap();
        let base = read_mask(&p).unwrap();

        let img = Volume::from_fn([2, 3, 4], |x, y, z| (x * 12 + y * 4 + z) as f32 * 0.5)
            .with_geometry(base.geometry.clone());
        let msk = img.map(|v| (v > 3.0) as u8);
        for ext in ["nii", "nii.gz"] {
            let pi = d.join(format!("img.{ext}"));
            let pm = d.join(format!("msk.{ext}"));
            write_image(&pi, &img).unwrap();
            write_mask(&pm, &msk).unwrap();
            let ri = read_image(&pi).unwrap();
            let rm = read_mask(&pm).unwrap();
            assert_eq!(ri.data(), img.data());
            assert_eq!(rm.data(), msk.data());
            let h = ri.geometry.header.as_ref().unwrap();
            assert_eq!(h.datatype, 16);
            assert_eq!(rm.geometry.header.as_ref().unwrap().datatype, 2);
            assert_eq!((h.qform_code, h.sform_code), (1, 1));
            assert_eq!(h.srow_x, [0.7, 0.0, 0.0, -12.5]);
            assert_eq!(&h.pixdim[1..4], &[0.7, 0.8, 2.5]);
            assert_eq!(&h.dim[..4], &[3, 2, 3, 4]);
        }
        // Stored data really is x fastest: the raw .nii's second voxel is (1, 0, 0).
        let bytes = std::fs::read(d.join("msk.nii")).unwrap();
        let first: Vec<u8> = bytes[352..358].to_vec();
        let want: Vec<u8> =
            (0..2).flat_map(|y| (0..2).map(move |x| (x, y))).take(6).map(|(x, y)| msk.get(x, y, 0)).collect();
        assert_eq!(&first[..4], &want[..4]);
        assert_eq!(first[1], msk.get(1, 0, 0));
        assert_eq!(first[2], msk.get(0, 1, 0));
        // No temporary files are left behind.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn a_failed_write_names_the_file_and_the_os_error() {
        let (_d, d) = tmpdir("wfail");
        let m = Volume::from_fn([2, 2, 2], |x, _, _| x as u8);
        let path = d.join("absent").join("mask.nii.gz");
        let e = format!("{:#}", write_mask(&path, &m).unwrap_err());
        assert!(e.contains("mask.nii.gz") && e.contains("No such file or directory"), "{e}");
        assert!(!e.contains("Io(") && !e.contains("kind:"), "the debug form of the error: {e}");
    }

    #[test]
    fn rejects_bad_files_naming_them() {
        let (_d, d) = tmpdir("bad");
        let data: Vec<u8> = (0..24).collect();
        let good = raw_nifti([2, 3, 4], 2, 8, 0.0, 0.0, &data, false);

        let trunc = d.join("trunc.nii");
        std::fs::write(&trunc, &good[..good.len() - 5]).unwrap();
        let e = format!("{:#}", read_image(&trunc).unwrap_err());
        assert!(e.contains("trunc.nii") && e.contains("truncated"), "{e}");

        let gz = gzip(&good);
        let truncgz = d.join("trunc.nii.gz");
        std::fs::write(&truncgz, &gz[..gz.len() - 12]).unwrap();
        let e = format!("{:#}", read_image(&truncgz).unwrap_err());
        assert!(e.contains("trunc.nii.gz"), "{e}");

        let mut corrupt = gz.clone();
        for b in &mut corrupt[20..40] {
            *b ^= 0x5a;
        }
        let cp = d.join("corrupt.nii.gz");
        std::fs::write(&cp, &corrupt).unwrap();
        let e = format!("{:#}", read_image(&cp).unwrap_err());
        assert!(e.contains("corrupt.nii.gz"), "{e}");

        let rgb = d.join("rgb.nii");
        std::fs::write(&rgb, raw_nifti([2, 3, 4], 128, 24, 0.0, 0.0, &[0; 72], false)).unwrap();
        let e = format!("{:#}", read_image(&rgb).unwrap_err());
        assert!(e.contains("rgb.nii") && e.contains("unsupported voxel type"), "{e}");

        let huge = d.join("huge.nii");
        std::fs::write(&huge, raw_nifti([30000, 30000, 30000], 2, 8, 0.0, 0.0, &data, false)).unwrap();
        let e = format!("{:#}", read_image(&huge).unwrap_err());
        assert!(e.contains("huge.nii") && e.contains("implausibly large"), "{e}");

        let zero = d.join("zero.nii");
        std::fs::write(&zero, raw_nifti([2, 0, 4], 2, 8, 0.0, 0.0, &data, false)).unwrap();
        let e = format!("{:#}", read_image(&zero).unwrap_err());
        assert!(e.contains("zero.nii") && e.contains("dim[2]"), "{e}");

        let big = d.join("big.nii");
        std::fs::write(&big, raw_nifti([300, 300, 300], 2, 8, 0.0, 0.0, &data, false)).unwrap();
        let e = format!("{:#}", read_image(&big).unwrap_err());
        assert!(e.contains("big.nii") && e.contains("truncated"), "{e}");

        let short = d.join("short.nii");
        std::fs::write(&short, &good[..100]).unwrap();
        let e = format!("{:#}", read_image(&short).unwrap_err());
        assert!(e.contains("short.nii") && e.contains("header"), "{e}");

        let frac = d.join("frac.nii");
        std::fs::write(&frac, raw_nifti([2, 3, 4], 2, 8, 0.5, 0.0, &data, false)).unwrap();
        let e = format!("{:#}", read_mask(&frac).unwrap_err());
        assert!(e.contains("frac.nii") && e.contains("not integers"), "{e}");

        assert!(write_mask(d.join("x.png"), &Mask::filled([1, 1, 1], 0)).is_err());
    }
}

//! 3D voxel arrays and their geometry.
//!
//! A [`Volume`] is indexed (x, y, z) and stored flat, X-major with Z fastest:
//! `index = (x * ny + y) * nz + z`. That is the row-major layout of the engine's N, C, X, Y, Z
//! tensors, so one volume is one (C = 1) slab of a batch without reordering. NIfTI stores x
//! fastest; `nifti_io` converts on the way in and out.

use anyhow::{Result, bail};
use nifti::NiftiHeader;

/// Spacing and the header a volume was read with, carried to the files written from it so that
/// they overlay the input in a viewer.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// Voxel size in millimetres along X, Y, Z (1 when unknown).
    pub spacing: [f32; 3],
    /// The NIfTI header read from disk (or built from another format's geometry).
    pub header: Option<Box<NiftiHeader>>,
}

impl Default for Geometry {
    fn default() -> Self {
        Self { spacing: [1.0; 3], header: None }
    }
}

impl Geometry {
    pub fn with_spacing(spacing: [f32; 3]) -> Self {
        Self { spacing, header: None }
    }

    /// The geometry of the sub-volume starting at voxel `offset`: the sform and qform origins
    /// move to where that voxel lies, so the crop still overlays the original in world space.
    pub fn cropped(&self, offset: [usize; 3]) -> Self {
        let mut g = self.clone();
        if let Some(h) = g.header.as_deref_mut() {
            let o = offset.map(|v| v as f64);
            let rows = [&mut h.srow_x, &mut h.srow_y, &mut h.srow_z];
            for r in rows {
                let shift: f64 = (0..3).map(|k| r[k] as f64 * o[k]).sum();
                r[3] = (r[3] as f64 + shift) as f32;
            }
            let m = qform_matrix(h);
            let q = [&mut h.quatern_x, &mut h.quatern_y, &mut h.quatern_z];
            for (i, t) in q.into_iter().enumerate() {
                let shift: f64 = (0..3).map(|k| m[i][k] * o[k]).sum();
                *t = (*t as f64 + shift) as f32;
            }
        }
        g
    }
}

/// The 3x3 voxel-to-world matrix of the NIfTI qform (rotation from the quaternion, times
/// pixdim, with qfac = `pixdim[0]` flipping the third axis).
pub fn qform_matrix(h: &NiftiHeader) -> [[f64; 3]; 3] {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let s = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64 * qfac];
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for k in 0..3 {
            m[i][k] = r[i][k] * s[k];
        }
    }
    m
}

#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T> {
    dims: [usize; 3],
    data: Vec<T>,
    pub geometry: Geometry,
}

/// An intensity image.
pub type Image = Volume<f32>;
/// A label mask (0 = background, 1 = foreground).
pub type Mask = Volume<u8>;

impl<T: Copy> Volume<T> {
    pub fn filled(dims: [usize; 3], value: T) -> Self {
        Self { dims, data: vec![value; dims.iter().product()], geometry: Geometry::default() }
    }

    /// A volume over `data` in this module's layout (Z fastest); the length must match `dims`.
    pub fn from_vec(dims: [usize; 3], data: Vec<T>) -> Result<Self> {
        let n: usize = dims.iter().product();
        if data.len() != n {
            bail!("volume of {}x{}x{} needs {n} voxels, got {}", dims[0], dims[1], dims[2], data.len());
        }
        Ok(Self { dims, data, geometry: Geometry::default() })
    }

    pub fn from_fn(dims: [usize; 3], mut f: impl FnMut(usize, usize, usize) -> T) -> Self {
        let mut data = Vec::with_capacity(dims.iter().product());
        for x in 0..dims[0] {
            for y in 0..dims[1] {
                for z in 0..dims[2] {
                    data.push(f(x, y, z));
                }
            }
        }
        Self { dims, data, geometry: Geometry::default() }
    }

    pub fn with_geometry(mut self, geometry: Geometry) -> Self {
        self.geometry = geometry;
        self
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &[T] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    #[inline]
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        debug_assert!(x < self.dims[0] && y < self.dims[1] && z < self.dims[2]);
        (x * self.dims[1] + y) * self.dims[2] + z
    }

    #[inline]
    pub fn get(&self, x: usize, y: usize, z: usize) -> T {
        self.data[self.index(x, y, z)]
    }

    #[inline]
    pub fn set(&mut self, x: usize, y: usize, z: usize, v: T) {
        let i = self.index(x, y, z);
        self.data[i] = v;
    }

    /// The same geometry with every voxel mapped through `f`.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Volume<U> {
        Volume {
            dims: self.dims,
            data: self.data.iter().map(|&v| f(v)).collect(),
            geometry: self.geometry.clone(),
        }
    }

    /// The box `[lo, lo + size)`; it must lie inside the volume.
    pub fn crop(&self, lo: [usize; 3], size: [usize; 3]) -> Result<Self> {
        for a in 0..3 {
            if lo[a] + size[a] > self.dims[a] {
                bail!("crop {lo:?}+{size:?} exceeds the volume {:?} along axis {a}", self.dims);
            }
        }
        let mut data = Vec::with_capacity(size.iter().product());
        for x in lo[0]..lo[0] + size[0] {
            for y in lo[1]..lo[1] + size[1] {
                let start = self.index(x, y, 0) + lo[2];
                data.extend_from_slice(&self.data[start..start + size[2]]);
            }
        }
        Ok(Self { dims: size, data, geometry: self.geometry.cropped(lo) })
    }

    /// Pads with `value`: `before[a]` voxels in front and `after[a]` behind along each axis.
    /// The geometry is kept as it was: padded volumes are intermediates that are cropped back
    /// before anything is written.
    pub fn pad(&self, before: [usize; 3], after: [usize; 3], value: T) -> Self {
        let dims = [0, 1, 2].map(|a| self.dims[a] + before[a] + after[a]);
        let mut out = Self::filled(dims, value);
        for x in 0..self.dims[0] {
            for y in 0..self.dims[1] {
                let src = self.index(x, y, 0);
                let dst = out.index(x + before[0], y + before[1], before[2]);
                out.data[dst..dst + self.dims[2]].copy_from_slice(&self.data[src..src + self.dims[2]]);
            }
        }
        out.geometry = self.geometry.clone();
        out
    }

    /// The axial (constant z) slice as rows of y for each x: `slice[x * ny + y]`.
    pub fn axial_slice(&self, z: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.dims[0] * self.dims[1]);
        for x in 0..self.dims[0] {
            for y in 0..self.dims[1] {
                out.push(self.get(x, y, z));
            }
        }
        out
    }
}

impl Mask {
    pub fn count_foreground(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }

    /// The inclusive bounding box `(min, max)` of the non-zero voxels, or `None` when empty.
    pub fn bounding_box(&self) -> Option<([usize; 3], [usize; 3])> {
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        let mut any = false;
        let [_, ny, nz] = self.dims;
        for (i, &v) in self.data.iter().enumerate() {
            if v != 0 {
                any = true;
                let p = [i / (ny * nz), (i / nz) % ny, i % nz];
                for a in 0..3 {
                    lo[a] = lo[a].min(p[a]);
                    hi[a] = hi[a].max(p[a]);
                }
            }
        }
        any.then_some((lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_x_major_with_z_fastest() {
        let v = Volume::from_fn([2, 3, 4], |x, y, z| (100 * x + 10 * y + z) as u32);
        assert_eq!(v.data()[1], 1);
        assert_eq!(v.data()[4], 10);
        assert_eq!(v.data()[12], 100);
        assert_eq!(v.get(1, 2, 3), 123);
        assert_eq!(v.index(1, 2, 3), 23);
    }

    #[test]
    fn crop_and_pad_place_voxels_where_expected() {
        let v = Volume::from_fn([4, 5, 6], |x, y, z| (100 * x + 10 * y + z) as i32);
        let c = v.crop([1, 2, 3], [2, 2, 3]).unwrap();
        assert_eq!(c.dims(), [2, 2, 3]);
        assert_eq!(c.get(0, 0, 0), 123);
        assert_eq!(c.get(1, 1, 2), 235);
        assert!(v.crop([3, 0, 0], [2, 1, 1]).is_err());
        let p = c.pad([1, 0, 2], [0, 3, 1], -1);
        assert_eq!(p.dims(), [3, 5, 6]);
        assert_eq!(p.get(0, 0, 2), -1);
        assert_eq!(p.get(1, 0, 2), 123);
        assert_eq!(p.get(2, 1, 4), 235);
        assert_eq!(p.get(2, 2, 4), -1);
    }

    #[test]
    fn bounding_box_of_mask() {
        let mut m = Mask::filled([5, 6, 7], 0);
        assert!(m.bounding_box().is_none());
        m.set(1, 4, 2, 1);
        m.set(3, 2, 6, 1);
        assert_eq!(m.bounding_box(), Some(([1, 2, 2], [3, 4, 6])));
        assert_eq!(m.count_foreground(), 2);
    }

    #[test]
    fn cropped_geometry_moves_the_origin_to_the_crop_corner() {
        let mut h = NiftiHeader {
            pixdim: [1.0, 0.5, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
            srow_x: [0.5, 0.0, 0.0, 10.0],
            srow_y: [0.0, 2.0, 0.0, 20.0],
            srow_z: [0.0, 0.0, 3.0, 30.0],
            quatern_x: 10.0,
            quatern_y: 20.0,
            quatern_z: 30.0,
            ..NiftiHeader::default()
        };
        h.qform_code = 1;
        let g = Geometry { spacing: [0.5, 2.0, 3.0], header: Some(Box::new(h)) };
        let c = g.cropped([2, 3, 1]);
        let h = c.header.unwrap();
        assert_eq!([h.srow_x[3], h.srow_y[3], h.srow_z[3]], [11.0, 26.0, 33.0]);
        assert_eq!([h.quatern_x, h.quatern_y, h.quatern_z], [11.0, 26.0, 33.0]);
    }
}

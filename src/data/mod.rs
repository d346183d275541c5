//! Volumes, their file formats, datasets, synthetic phantoms, augmentation and batch sampling.

pub mod augment;
pub mod dataset;
pub mod nifti_io;
pub mod nrrd;
pub mod prepare_la;
pub mod sampler;
pub mod synth;
pub mod volume;

pub use volume::{Geometry, Image, Mask, Volume};

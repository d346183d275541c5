//! The convolutions the network layers call. For now the reference kernels of `conv_ref`; the
//! tuned kernels replace this file with the same signatures.

pub use crate::ops::conv_ref::{conv_transpose3d, conv3d};

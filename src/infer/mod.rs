//! Whole-volume inference.

pub mod window;
pub mod predict;

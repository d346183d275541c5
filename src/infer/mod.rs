//! Whole-volume inference.

pub mod predict;
pub mod window;

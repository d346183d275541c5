//! Whole-volume inference.

pub mod window;

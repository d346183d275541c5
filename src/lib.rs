//! caml-wgpu: CAML semi-supervised 3D segmentation on a minimal WGSL compute engine.

pub mod autograd;
pub mod caml;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod fsutil;
pub mod gpu;
pub mod gradcheck;
pub mod infer;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod overlay;
pub mod plot;
pub mod rng;
pub mod tensor;
pub mod train;

pub use autograd::{Grads, backward, no_grad};
pub use tensor::{DType, Tensor};

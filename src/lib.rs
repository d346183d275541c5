//! caml-wgpu: CAML semi-supervised 3D segmentation on a minimal WGSL compute engine.

pub mod autograd;
pub mod caml;
pub mod checkpoint;
pub mod cli;
pub mod gpu;
pub mod gradcheck;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod tensor;

pub use autograd::{Grads, backward, no_grad};
pub use tensor::{DType, Tensor};

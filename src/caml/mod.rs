//! The paper's method: losses, memory bank, omni-correlation, the model and its training step.

pub mod cma;
pub mod losses;
pub mod memory;
pub mod model;
pub mod omni;
pub mod step;

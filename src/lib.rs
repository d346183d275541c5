pub mod cli;
pub mod data;
pub mod gpu;
pub mod infer;
pub mod metrics;
pub mod overlay;

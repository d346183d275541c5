pub mod cli;
pub mod data;
pub mod gpu;

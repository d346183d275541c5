//! Layers with named parameters, PyTorch's state_dict names and initialization.

pub mod transformer;

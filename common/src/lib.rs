//! The only place the kernel programs and the daemon agree on map names, keys and values.
//!
//! Everything here is `#[repr(C)]`, `Copy`, with explicit padding and a compile-time size
//! check, so the same bytes mean the same thing on both sides. Addresses are kept in network
//! byte order; conversion to host types happens at the API edge only.
#![no_std]

pub mod headers;
pub mod maps;
pub mod steer;

pub use headers::*;
pub use maps::*;
pub use steer::*;

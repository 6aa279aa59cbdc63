//! The only place the kernel programs and the daemon agree on map names, keys and values, header
//! layouts, and the indexes and names of the statistics. Everything is `#[repr(C)]`, `Copy`, with
//! explicit padding and a compile-time size check; addresses stay in network byte order.
#![no_std]

pub mod design;
pub mod headers;
pub mod iface;
pub mod maps;
pub mod stats;
pub mod steer;

pub use headers::*;
pub use iface::*;
pub use maps::*;
pub use stats::*;
pub use steer::*;

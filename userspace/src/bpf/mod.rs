//! Everything that touches the kernel's BPF side and the devices: loading the embedded object
//! (`loader`), attaching it (`attach`), devices and link events (`links`), the kernel clock
//! (`clock`), reading the counter maps (`slots`, `counters`, `batch`) and the host checks and locks
//! (`system`). Nothing here knows about the ledger, identity or the API.

pub mod attach;
pub mod batch;
pub mod clock;
pub mod counters;
pub mod links;
pub mod loader;
pub mod slots;
pub mod system;

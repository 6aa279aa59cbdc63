//! Empty library target: lets `userspace` name this crate as a build-dependency so cargo
//! rebuilds the daemon when the eBPF sources change. The programs are in `main.rs`.
#![no_std]

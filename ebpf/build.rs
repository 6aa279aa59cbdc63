//! Build script of the eBPF crate: rebuild the object when bpf-linker changes (it is this
//! crate's linker, so a new version must relink the programs).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

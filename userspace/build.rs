//! Builds the eBPF object with aya-build on the toolchain named in the workspace
//! Cargo.toml ([workspace.metadata.tunmeter] ebpf-toolchain) and leaves it in OUT_DIR.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let toolchain = meta.workspace_metadata["tunmeter"]["ebpf-toolchain"]
        .as_str()
        .ok_or_else(|| anyhow!("[workspace.metadata.tunmeter] ebpf-toolchain missing in Cargo.toml"))?
        .to_owned();
    let ebpf = meta
        .packages
        .iter()
        .find(|p| p.name.as_str() == "tunmeter-ebpf")
        .ok_or_else(|| anyhow!("tunmeter-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent of {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}

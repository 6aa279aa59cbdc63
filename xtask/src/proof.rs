//! `cargo xtask toolchain-proof`: runs CI's toolchain step (`.ci/install-toolchain`) in a
//! scratch `RUSTUP_HOME` with `RUSTUP_AUTO_INSTALL=0`, as on a fresh machine, and checks that
//! `cargo --version` in the checkout then prints the pinned version. Part of `cargo xtask test`.

use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{cargo_bin_dir, cmd, describe, pinned_toolchain, root, target_dir};

/// Set to 1 to leave the proof out of `cargo xtask test` (it downloads the pinned toolchain,
/// ~11 s and ~620 MB unpacked on these machines).
pub const SKIP_ENV: &str = "TUNMETER_SKIP_TOOLCHAIN_PROOF";

pub fn toolchain_proof() -> Result<()> {
    let started = Instant::now();
    let (channel, _) = pinned_toolchain()?;
    let home = target_dir().join("toolchain-proof");
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let result = prove(&home, &channel);
    let _ = std::fs::remove_dir_all(&home);
    result?;
    println!(
        "ok: toolchain proof: .ci/install-toolchain installed {channel} into an empty RUSTUP_HOME \
         with RUSTUP_AUTO_INSTALL=0 ({} s)",
        started.elapsed().as_secs()
    );
    Ok(())
}

fn prove(home: &std::path::Path, channel: &str) -> Result<()> {
    // The rustup proxy itself, not whatever `cargo` an outer cargo put first on PATH.
    let cargo = cargo_bin_dir().map(|d| d.join("cargo")).filter(|p| p.exists()).context("no rustup cargo proxy")?;
    let scratch = |program: &std::ffi::OsStr| {
        let mut c = cmd(program);
        // An outer `cargo xtask` (rustup's proxy) sets these for its children; a fresh shell has none.
        for var in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "CARGO_TARGET_DIR"] {
            c.env_remove(var);
        }
        c.env("RUSTUP_HOME", home).env("RUSTUP_AUTO_INSTALL", "0").current_dir(root());
        c
    };
    // Before: the scratch home has no toolchain and auto-install is off, so cargo must fail.
    let before = scratch(cargo.as_os_str()).arg("--version").output().context("running the cargo proxy")?;
    if before.status.success() {
        bail!(
            "the proof is void: `cargo --version` succeeded in an empty RUSTUP_HOME with RUSTUP_AUTO_INSTALL=0 ({})",
            String::from_utf8_lossy(&before.stdout).trim()
        );
    }
    let mut install = scratch("bash".as_ref());
    install.arg(root().join(".ci/install-toolchain"));
    let what = describe(&install);
    println!("running: RUSTUP_HOME={} RUSTUP_AUTO_INSTALL=0 {what}", home.display());
    let status = install.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed in a scratch RUSTUP_HOME ({status})");
    }
    let after = scratch(cargo.as_os_str()).arg("--version").output().context("running the cargo proxy")?;
    let version = String::from_utf8_lossy(&after.stdout).trim().to_owned();
    if !after.status.success() || !version.starts_with(&format!("cargo {channel} ")) {
        bail!(
            "after .ci/install-toolchain, `cargo --version` printed {version:?} (status {}), want cargo {channel}: {}",
            after.status,
            String::from_utf8_lossy(&after.stderr).trim()
        );
    }
    println!("ok: {version}");
    Ok(())
}

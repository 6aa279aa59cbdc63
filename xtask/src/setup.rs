//! `cargo xtask setup`: checks every prerequisite and installs only what is missing.

use std::env::consts::ARCH;

use anyhow::{Context, Result, bail};

use crate::util::{cmd, describe, is_root, output, pinned_toolchain, probe, run, tunmeter_metadata};

/// Debian packages needed to build (bpf-linker against LLVM) and to run the tests, lab and demo.
/// `{llvm}` stands for `llvm-major` from `[workspace.metadata.tunmeter]`.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker build
    "llvm-{llvm}-dev",
    "libpolly-{llvm}-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "build-essential",
    "pkg-config",
    "ca-certificates",
    "curl",
    // kernel tests, lab and demo
    "bpftool",
    "iproute2",
    "nftables",
    "iperf3",
    "iputils-ping",
    "util-linux", // nsenter
    "procps",
];

const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    check_os()?;
    let llvm = tunmeter_metadata("llvm-major")?;
    apt_packages(&llvm)?;
    rust_toolchains()?;
    bpf_linker(&llvm)?;
    bpffs()?;
    println!("setup: everything is in place");
    Ok(())
}

/// Fails with a message naming the fix unless running as root.
/// `task` is the xtask subcommand to suggest (`setup`, `test`, ...).
pub fn require_root(why: &str, task: &str) -> Result<()> {
    if !is_root() {
        bail!("{why}: run as root, e.g. sudo -E cargo xtask {task}");
    }
    Ok(())
}

fn check_os() -> Result<()> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    if field("ID") != "debian" || field("VERSION_ID") != "12" {
        bail!(
            "`cargo xtask setup` supports Debian 12 (bookworm) only, this is {:?}. \
             Use a Debian 12 machine or container, or install by hand the packages listed in \
             xtask/src/setup.rs (APT_PACKAGES), the toolchains and bpf-linker described in \
             ../shared/TOOLCHAIN.md",
            field("PRETTY_NAME")
        );
    }
    println!("ok: {} detected", field("PRETTY_NAME"));
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    probe(cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

fn apt_packages(llvm: &str) -> Result<()> {
    let mut missing = Vec::new();
    for name in APT_PACKAGES.iter().map(|p| p.replace("{llvm}", llvm)) {
        if dpkg_installed(&name) {
            println!("ok: {name} present");
        } else {
            println!("missing: {name}");
            missing.push(name);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")), "setup")?;
    println!("installing: {} (apt-get)", missing.join(" "));
    run(cmd("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(cmd("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still: Vec<_> = missing.iter().filter(|p| !dpkg_installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get reported success but these are still not installed: {still:?}");
    }
    Ok(())
}

fn rust_toolchains() -> Result<()> {
    if probe(rustup().arg("--version")).is_none() {
        bail!(
            "rustup not found (looked on PATH and in ~/.cargo/bin): install it from \
             https://rustup.rs, then rerun `cargo xtask setup`"
        );
    }
    let (channel, components) = pinned_toolchain()?;
    ensure_toolchain(&channel, &components)?;
    let ebpf = tunmeter_metadata("ebpf-toolchain")?;
    ensure_toolchain(&ebpf, &["rust-src".to_owned()])?;
    Ok(())
}

/// rustup, run outside the workspace: inside it, rust-toolchain.toml would make rustup
/// install the pinned toolchain behind our back (e.g. on `rustup --version`).
fn rustup() -> std::process::Command {
    let mut c = cmd("rustup");
    c.current_dir("/");
    c
}

/// rustup names installed toolchains `<channel>-<host triple>`.
fn host_triple() -> String {
    format!("{ARCH}-unknown-linux-gnu")
}

fn ensure_toolchain(toolchain: &str, components: &[String]) -> Result<()> {
    let full = format!("{toolchain}-{}", host_triple());
    let list = output(rustup().args(["toolchain", "list"]))?;
    let installed =
        list.lines().filter_map(|l| l.split_whitespace().next()).any(|name| name == toolchain || name == full);
    if !installed {
        println!("installing: rust toolchain {toolchain} (profile minimal, components: {})", components.join(", "));
        let mut c = rustup();
        c.args(["toolchain", "install", toolchain, "--profile", "minimal"]).arg("--no-self-update");
        for comp in components {
            c.args(["--component", comp]);
        }
        return run(&mut c);
    }
    println!("ok: rust toolchain {toolchain} present");

    let have = output(rustup().args(["component", "list", "--installed", "--toolchain", toolchain]))?;
    let host = host_triple();
    let missing: Vec<&String> = components
        .iter()
        .filter(|comp| !have.lines().map(str::trim).any(|l| l == comp.as_str() || l == format!("{comp}-{host}")))
        .collect();
    if missing.is_empty() {
        if !components.is_empty() {
            println!("ok: {toolchain} components present: {}", components.join(", "));
        }
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
    println!("installing: {toolchain} components {}", names.join(", "));
    run(rustup().args(["component", "add", "--toolchain", toolchain]).args(&names))
}

fn bpf_linker(llvm: &str) -> Result<()> {
    let want = tunmeter_metadata("bpf-linker-version")?;
    let found = probe(cmd("bpf-linker").arg("--version"))
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let version = found.as_deref().and_then(|s| s.split_whitespace().nth(1)).map(str::to_owned);
    if version.as_deref() == Some(want.as_str()) {
        println!("ok: bpf-linker {want} present");
        return Ok(());
    }
    match &found {
        Some(f) => println!("installing: bpf-linker {want} (found {f:?})"),
        None => println!("installing: bpf-linker {want} (not found)"),
    }
    let (channel, _) = pinned_toolchain()?;
    // LLVM_PREFIX is what makes bpf-linker's build use Debian's LLVM instead of
    // /usr/bin/llvm-config (LLVM 14); LLVM_SYS_*_PREFIX alone does not (TOOLCHAIN.md).
    let mut c = cmd("cargo");
    c.arg(format!("+{channel}"))
        .args(["install", &format!("bpf-linker@{want}"), "--locked", "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{llvm}")])
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"));
    let what = format!("LLVM_PREFIX=/usr/lib/llvm-{llvm} {}", describe(&c));
    run(&mut c).with_context(|| format!("building bpf-linker: {what}"))?;
    let after = output(cmd("bpf-linker").arg("--version"))?;
    if after.split_whitespace().nth(1) != Some(want.as_str()) {
        bail!(
            "installed bpf-linker {want}, but `bpf-linker --version` on PATH says {:?} \
             (is another bpf-linker earlier on PATH?)",
            after.trim()
        );
    }
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    }))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        println!("ok: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    require_root(&format!("mounting bpffs at {BPFFS}"), "setup")?;
    println!("installing: bpffs at {BPFFS} (mount -t bpf bpf {BPFFS})");
    run(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but {BPFFS} is not a bpffs mount");
    }
    Ok(())
}

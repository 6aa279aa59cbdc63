//! Small helpers shared by the tasks: workspace paths, pinned versions from the manifests, and
//! running commands with errors that say what failed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the workspace root")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root().join(dir),
        _ => root().join("target"),
    }
}

/// Reads one string value of `[workspace.metadata.tunmeter]` in the root `Cargo.toml`
/// (`ebpf-toolchain`, `bpf-linker-version`, `llvm-major`).
///
/// The file is parsed directly instead of through `cargo metadata`, so this works even while
/// another member's manifest is broken.
pub fn tunmeter_metadata(key: &str) -> Result<String> {
    let path = root().join("Cargo.toml");
    let doc = read_toml(&path)?;
    doc.get("workspace")
        .and_then(|w| w.get("metadata"))
        .and_then(|m| m.get("tunmeter"))
        .and_then(|t| t.get(key))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{}: missing string [workspace.metadata.tunmeter].{key}", path.display()))
}

/// The userspace toolchain from `rust-toolchain.toml`: its channel and components.
pub fn pinned_toolchain() -> Result<(String, Vec<String>)> {
    let path = root().join("rust-toolchain.toml");
    let doc = read_toml(&path)?;
    let toolchain = doc.get("toolchain").with_context(|| format!("{}: missing [toolchain]", path.display()))?;
    let channel = toolchain
        .get("channel")
        .and_then(|c| c.as_str())
        .with_context(|| format!("{}: missing string toolchain.channel", path.display()))?
        .to_owned();
    let components = match toolchain.get("components").and_then(|c| c.as_array()) {
        Some(list) => list.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect(),
        None => vec!["rustfmt".to_owned(), "clippy".to_owned()],
    };
    Ok((channel, components))
}

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse::<toml::Table>().with_context(|| format!("parsing {}", path.display()))
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where rustup and `cargo install` put binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cargo"),
    };
    Some(home.join("bin"))
}

/// `$PATH` with the cargo bin directory in front (unless it is already on it).
fn child_path() -> OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.insert(0, bin);
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// A command run from the workspace root, with the cargo bin directory on its `PATH`
/// (also used to look up `program`).
pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", child_path()).current_dir(root());
    c
}

/// The command line, for messages.
pub fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for arg in c.get_args() {
        let arg = arg.to_string_lossy();
        s.push(' ');
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            s.push_str(&format!("'{arg}'"));
        } else {
            s.push_str(&arg);
        }
    }
    s
}

/// Runs `c` with inherited stdio; fails unless it exits successfully.
pub fn run(c: &mut Command) -> Result<()> {
    let what = describe(c);
    let status = c.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs `c` and returns its stdout; fails (quoting stderr) unless it exits successfully.
pub fn output(c: &mut Command) -> Result<String> {
    let what = describe(c);
    let out = c.stdin(Stdio::null()).output().with_context(|| format!("starting `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `c` for a check: its output, or `None` if it could not start (e.g. not installed).
pub fn probe(c: &mut Command) -> Option<Output> {
    c.stdin(Stdio::null()).output().ok()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

//! tunmeter's developer tasks, run as `cargo xtask <task>` (alias in .cargo/config.toml).

mod demo;
mod setup;
mod util;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::util::{cmd, describe, target_dir};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "tunmeter developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the prerequisites (Debian packages, Rust toolchains, bpf-linker, bpffs) and
    /// install only what is missing. Safe to run repeatedly.
    Setup,
    /// Run setup, then the whole test suite (`cargo test --no-fail-fast` over the default
    /// members) as root, with TUNMETER_REQUIRE_ROOT_TESTS=1 so root-only tests cannot skip.
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- -p tunmeter -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, build, start the lab with traffic and the daemon in its server namespace,
    /// and show the live per-client table until Ctrl-C.
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Run setup, then the benchmark test (release build); output also goes to
    /// target/bench.txt.
    Bench,
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Test { args } => test(&args),
        Task::Demo { seconds } => demo::demo(seconds),
        Task::Bench => bench(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(extra: &[String]) -> Result<()> {
    setup::setup()?;
    setup::require_root("the kernel tests load BPF programs and create network namespaces", "test")?;
    // No --workspace: the default members leave out the eBPF crate, which only builds for
    // the BPF target (userspace/build.rs builds it).
    let mut c = cmd("cargo");
    c.args(["test", "--no-fail-fast"]).args(extra).env("TUNMETER_REQUIRE_ROOT_TESTS", "1");
    let what = describe(&c);
    println!("running: {what}");
    let start = Instant::now();
    let status = c.status().with_context(|| format!("starting `{what}`"))?;
    let secs = start.elapsed().as_secs();
    if status.success() {
        println!("xtask test: all tests passed ({secs} s)");
        Ok(())
    } else {
        println!("xtask test: FAILED ({status}, {secs} s)");
        bail!("`{what}` failed ({status})");
    }
}

fn bench() -> Result<()> {
    setup::setup()?;
    let report = target_dir().join("bench.txt");
    std::fs::create_dir_all(target_dir()).with_context(|| format!("creating {}", target_dir().display()))?;
    let mut file = File::create(&report).with_context(|| format!("creating {}", report.display()))?;
    let mut c = cmd("cargo");
    c.args(["test", "--release", "-p", "tunmeter", "--test", "bench", "--"])
        .args(["--ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped());
    let what = describe(&c);
    println!("running: {what}");
    let mut child = c.spawn().with_context(|| format!("starting `{what}`"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("reading the output of `{what}`"))?;
        writeln!(out, "{line}")?;
        writeln!(file, "{line}").with_context(|| format!("writing {}", report.display()))?;
    }
    let status = child.wait().with_context(|| format!("waiting for `{what}`"))?;
    println!("xtask bench: output saved to {}", report.display());
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

//! tunmeter's developer tasks, run as `cargo xtask <task>` (alias in .cargo/config.toml):
//! setup, check, test, demo and bench.

mod check;
mod demo;
mod modtree;
mod plots;
mod proof;
mod setup;
mod util;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::util::{cmd, describe, output, root, target_dir};

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
    /// Check the structure rules: no import cycles, layers, file sizes (ARCHITECTURE.md).
    Check,
    /// Run setup, the structure check, rustfmt and clippy, then the whole test suite (`cargo test --no-fail-fast` over the default
    /// members) as root, with TUNMETER_REQUIRE_ROOT_TESTS=1 so root-only tests cannot skip.
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- -p tunmeter -- --nocapture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run CI's toolchain step (.ci/install-toolchain) in a scratch RUSTUP_HOME with
    /// RUSTUP_AUTO_INSTALL=0 and check `cargo --version` prints the pinned version (~11 s,
    /// downloads the toolchain). `cargo xtask test` runs it unless TUNMETER_SKIP_TOOLCHAIN_PROOF=1.
    ToolchainProof,
    /// Run setup, build, start the lab with traffic and the daemon in its server namespace,
    /// and show the live per-client table until Ctrl-C.
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Run setup, then the benchmark test (release build); output also goes to
    /// target/bench.txt. The full run (about 15 minutes) rewrites BENCHMARKS.md; a partial one
    /// (--quick or --only) writes target/bench.txt only.
    Bench {
        /// The headline figures in a few minutes: counting, steering ns/packet and identity;
        /// no iperf3 runs and no daemon at 100,000 clients.
        #[arg(long)]
        quick: bool,
        /// Only these sections, comma-separated: counting, veth, daemon, steer, identity,
        /// alternatives, design.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Check => check::check(),
        Task::Test { args } => test(&args),
        Task::ToolchainProof => proof::toolchain_proof(),
        Task::Demo { seconds } => demo::demo(seconds),
        Task::Bench { quick, only } => bench(quick, only.as_deref()),
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
    let start = Instant::now();
    if std::env::var(proof::SKIP_ENV).as_deref() == Ok("1") {
        println!("skipped: toolchain proof ({}=1)", proof::SKIP_ENV);
    } else {
        proof::toolchain_proof()?;
    }
    lint()?;
    // No --workspace: the default members leave out the eBPF crate, which only builds for
    // the BPF target (userspace/build.rs builds it).
    let mut c = cmd("cargo");
    c.args(["test", "--no-fail-fast"]).args(extra).env("TUNMETER_REQUIRE_ROOT_TESTS", "1");
    let what = describe(&c);
    println!("running: {what}");
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

/// The checks that need no kernel: structure, formatting, clippy on every crate (the eBPF crate
/// built for its target). Each failure fails `cargo xtask test`.
fn lint() -> Result<()> {
    let started = Instant::now();
    check::check()?;
    run(cmd("cargo").args(["fmt", "--all", "--", "--check"]), "rustfmt found unformatted code: run `cargo fmt --all`")?;
    run(
        cmd("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]),
        "clippy found problems (userspace crates)",
    )?;
    run(&mut setup::ebpf_clippy()?, "clippy found problems (eBPF crate)")?;
    println!("xtask test: structure, rustfmt and clippy clean ({} s)", started.elapsed().as_secs());
    Ok(())
}

fn run(c: &mut std::process::Command, failure: &str) -> Result<()> {
    let what = describe(c);
    println!("running: {what}");
    let status = c.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("{failure} (`{what}`: {status})");
    }
    Ok(())
}

fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    let started = std::time::Instant::now();
    setup::setup()?;
    setup::require_root("the benchmarks load BPF programs and create network namespaces", "bench")?;
    let report = target_dir().join("bench.txt");
    std::fs::create_dir_all(target_dir()).with_context(|| format!("creating {}", target_dir().display()))?;
    let mut file = File::create(&report).with_context(|| format!("creating {}", report.display()))?;
    let mut c = cmd("cargo");
    // The benchmark is the `bench` module of the one integration-test binary `it`, ignored by
    // default: select it by filter.
    c.args(["test", "--release", "-p", "tunmeter", "--test", "it", "--"])
        .args(["bench::", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TUNMETER_REQUIRE_ROOT_TESTS", "1")
        .stdout(Stdio::piped());
    if quick {
        c.env("TM_BENCH_QUICK", "1");
    }
    if let Some(o) = only {
        c.env("TM_BENCH_ONLY", o);
    }
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
    let took = started.elapsed().as_secs();
    println!("xtask bench: output saved to {} (the run took {} min {} s)", report.display(), took / 60, took % 60);
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    if quick || only.is_some() {
        println!("xtask bench: a partial run (--quick/--only): BENCHMARKS.md is left as it is");
        return Ok(());
    }
    write_benchmarks_md(&report, took)
}

/// BENCHMARKS.md: the figures of this run (the lines the bench prints as Markdown), with the
/// command, commit and machine that produced them.
fn write_benchmarks_md(report: &std::path::Path, took_secs: u64) -> Result<()> {
    let text = std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    // The report starts mid-line (after libtest's "test bench::bench ... ") and ends before "ok".
    let start = text.find("# tunmeter benchmarks").context("no benchmark report in the output")?;
    let body = &text[start..];
    let body = body.find("\nok\n").map_or(body, |end| &body[..end]);
    let figures: Vec<&str> = body.lines().collect();
    let plots = plots::draw(body, &root().join("docs/bench"), "docs/bench/")?;
    let commit = output(cmd("git").args(["rev-parse", "--short", "HEAD"]).current_dir(root())).unwrap_or_default();
    let md = format!(
        "<!-- Written by `cargo xtask bench`; edits are overwritten. -->\n\
         Produced by `cargo xtask bench` (as root) at commit {}, on {}, in {} min (build included; \
         `cargo xtask bench --quick` gives the counting, steering and identity figures in a few minutes).\n\
         Targets: <= 40 ns/packet at 100,000 clients; >= 98% of no-program TCP throughput (issue 2); \
         daemon poll + ledger < 10% of one core and < 64 MiB RSS at 10,000 and 100,000 clients, \
         API client list p99 < 20 ms at 10,000 clients (issue 3); \
         steering path (lookup + rewrite) <= 120 ns/packet with 10,000 rules, forwarded TCP \
         throughput reported against iptables DNAT (issue 4); identity: what OpenVPN waits for at \
         each connect (the hook process against process start), `status 3` parsing, webhook \
         delivery from the outbox (issue 5); at scale (issue 14): the daemon < 10% of one core and \
         < 64 MiB at 100,000 clients, steering share <= 120 ns, counting <= 40 ns at 100,000 clients, \
         compared with nftables and iptables. The design choices behind these figures, with the \
         figures before and after each change: docs/performance.md.\n\
         These machines are noisy: compare figures within one run, not across runs.\n\n{}\n\n\
         ## Plots (this run's figures; black: the target)\n{}",
        commit.trim(),
        chrono_free_date(),
        took_secs.div_ceil(60),
        figures.join("\n").trim(),
        plots
    );
    let path = root().join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("xtask bench: figures written to {}", path.display());
    Ok(())
}

/// Today's date (UTC) from `date`, to avoid a date-time dependency for one line.
fn chrono_free_date() -> String {
    output(cmd("date").args(["-u", "+%Y-%m-%d"])).map(|s| s.trim().to_owned()).unwrap_or_default()
}

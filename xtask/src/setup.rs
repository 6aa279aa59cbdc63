//! `cargo xtask setup`: checks every prerequisite (Debian packages, toolchains, bpf-linker,
//! bpffs, npm packages) and installs only what is missing.

use std::env::consts::ARCH;

use anyhow::{Context, Result, bail};

use crate::util::{cmd, describe, is_root, output, pinned_toolchain, probe, root, run, tunmeter_metadata};

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
    // the steering benchmark compares forward rules with iptables DNAT (iptables-nft on Debian 12)
    "iptables",
    "iputils-ping",
    "util-linux", // nsenter
    "procps",
    // ledger and dashboard tests: the tests start their own throwaway PostgreSQL cluster from
    // the binaries in /usr/lib/postgresql/<major>/bin (the distro's `main` cluster is not used);
    // Playwright drives Debian's /usr/bin/chromium; sqlite3 is the CLI (tests lock databases)
    "postgresql",
    "chromium",
    "sqlite3",
    // steering tests (userspace/tests/steer_netns.rs) run their own HTTP and SOCKS5 proxies in
    // the lab namespaces, with configs of their own: tinyproxy-bin is the binary without the
    // tinyproxy service; dante-server comes with a danted service, which setup disables
    // (PROXY_SERVICES)
    "tinyproxy-bin",
    "dante-server",
    // OpenVPN and WireGuard labs (lab/src/openvpn.rs, lab/src/wireguard.rs): real OpenVPN 2.6 servers
    // and clients in namespaces, the userspace WireGuard (`wireguard-go`, no kernel module needed)
    // driven by `wg` (wireguard-tools), certificates made with the `openssl` CLI. The openvpn
    // package comes with an openvpn service, which setup disables (PROXY_SERVICES)
    "openvpn",
    "wireguard-go",
    "wireguard-tools",
    "openssl",
    // deployment tests (userspace/tests/it/deploy): `systemd-analyze verify`/`security` and
    // `syscall-filter` on deploy/tunmeter.service, and a strace of the daemon against its filter
    "systemd",
    "strace",
    // the API conformance test runs schemathesis (from PyPI, pinned: SCHEMATHESIS) in a venv
    // under target/ made by Debian's python3
    "python3",
    "python3-venv",
];

/// The API fuzzer of the conformance test (userspace/tests/it/conformance/mod.rs), pinned.
const SCHEMATHESIS: &str = "4.32.5";
/// Its venv, relative to the root (the test runs `<venv>/bin/schemathesis`).
const SCHEMATHESIS_VENV: &str = "target/schemathesis";

/// System services of the proxy packages: the tests never use them (they start their own
/// instances inside namespaces), so setup stops and disables them where they run. `tinyproxy`
/// is the full package's service, in case it is installed too. `openvpn`: the labs run their own
/// OpenVPN instances with their own configs (its init script only stops the instances it started
/// itself, pid files in /run/openvpn, never a lab's). (service, its binary)
const PROXY_SERVICES: &[(&str, &str)] =
    &[("danted", "/usr/sbin/danted"), ("tinyproxy", "/usr/bin/tinyproxy"), ("openvpn", "/usr/sbin/openvpn")];

/// Node.js major version that `playwright-core` (web/e2e) needs; Debian 12's `nodejs` is 18.
const NODE_MIN_MAJOR: u32 = 20;

/// The browser tests' npm project (package.json and package-lock.json), relative to the root.
const E2E_DIR: &str = "web/e2e";

const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    check_os()?;
    let llvm = tunmeter_metadata("llvm-major")?;
    apt_packages(&llvm)?;
    proxy_services();
    node_and_npm()?;
    e2e_node_modules()?;
    schemathesis()?;
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
    apt_install(missing)
}

/// Stops and disables the system services of the proxy packages ([`PROXY_SERVICES`]): the
/// steering tests start their own proxies, and a distro service would only listen on the host.
/// Never fails: with systemd it uses `systemctl`, without it (a container) the init script.
fn proxy_services() {
    let ok = |c: &mut std::process::Command| probe(c).is_some_and(|o| o.status.success());
    let systemd = std::path::Path::new("/run/systemd/system").is_dir();
    for &(svc, binary) in PROXY_SERVICES {
        let (running, enabled, stop): (bool, bool, Vec<String>) = if systemd {
            let unit = format!("{svc}.service");
            if !ok(cmd("systemctl").args(["cat", &unit])) {
                continue;
            }
            let running = ok(cmd("systemctl").args(["is-active", "--quiet", &unit]));
            let enabled = ok(cmd("systemctl").args(["is-enabled", "--quiet", &unit]));
            (running, enabled, vec!["systemctl".into(), "disable".into(), "--now".into(), unit])
        } else {
            let script = format!("/etc/init.d/{svc}");
            if !std::path::Path::new(&script).is_file() {
                continue;
            }
            // Without systemd nothing starts services at boot: only a running one matters. The
            // init scripts' `status` exits 0 either way, so look for the binary in /proc.
            let running = runs(binary);
            (running, false, vec![script, "stop".into()])
        };
        if !running && !enabled {
            println!("ok: service {svc} is not running");
            continue;
        }
        if !is_root() {
            println!(
                "warning: service {svc} is running or enabled; the tests do not need it (run setup as root to stop it)"
            );
            continue;
        }
        println!("stopping: service {svc} (the tests start their own instances)");
        if !ok(cmd(&stop[0]).args(&stop[1..])) {
            println!("warning: `{}` failed; the service is not needed, ignoring", stop.join(" "));
        }
    }
}

/// Whether a process of `binary` runs (visible in /proc).
fn runs(binary: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .any(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == std::path::Path::new(binary)))
}

/// `apt-get update` and `apt-get install --no-install-recommends` of `missing` (if any).
fn apt_install(missing: Vec<String>) -> Result<()> {
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

/// `node` and `npm` for the browser tests. The machine image may have them outside Debian's
/// packages (NodeSource's `nodejs`, which bundles npm and conflicts with Debian's `npm`), so
/// they are looked up on PATH and Debian's packages are installed only for what is missing.
fn node_and_npm() -> Result<()> {
    let version = |tool: &str| {
        probe(cmd(tool).arg("--version"))
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let (node, npm) = (version("node"), version("npm"));
    let mut missing = Vec::new();
    match &node {
        Some(v) => println!("ok: node {v} present"),
        None => {
            println!("missing: node (Debian package nodejs)");
            missing.push("nodejs".to_owned());
        }
    }
    match &npm {
        Some(v) => println!("ok: npm {v} present"),
        None => {
            // Debian's npm depends on Debian's nodejs: installing it next to another node would
            // replace that node.
            let debian_node = dpkg_installed("nodejs")
                && output(cmd("dpkg-query").args(["-W", "-f=${Version}", "nodejs"]))
                    .is_ok_and(|v| v.contains("dfsg") || v.contains("deb12"));
            if node.is_some() && !debian_node {
                bail!(
                    "node {} is on PATH but npm is not, and this node is not Debian's nodejs \
                     package, so Debian's npm would replace it: install the npm that comes with \
                     this node, then rerun `cargo xtask setup`",
                    node.as_deref().unwrap_or_default()
                );
            }
            println!("missing: npm (Debian package npm)");
            missing.push("npm".to_owned());
        }
    }
    apt_install(missing)?;
    let have = version("node").context("`node --version` fails after installing nodejs")?;
    version("npm").context("`npm --version` fails after installing npm")?;
    let major = have.trim_start_matches('v').split('.').next().and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < NODE_MIN_MAJOR) {
        bail!(
            "node {have} is too old: playwright-core (the browser tests, {E2E_DIR}) needs Node.js \
             {NODE_MIN_MAJOR} or newer, and Debian 12's nodejs package is 18. Put a Node.js \
             {NODE_MIN_MAJOR}+ (with its npm) first on PATH, then rerun `cargo xtask setup`"
        );
    }
    Ok(())
}

/// The browser tests' npm dependencies (playwright-core, pinned in web/e2e/package-lock.json):
/// `npm ci` unless web/e2e/node_modules already holds exactly the locked versions. Never
/// downloads a browser: the tests launch Debian's /usr/bin/chromium.
fn e2e_node_modules() -> Result<()> {
    let dir = root().join(E2E_DIR);
    if !dir.join("package-lock.json").is_file() {
        bail!("{}/package-lock.json is missing (it is committed with the repository)", dir.display());
    }
    // Every package of the lock file against node_modules/<name>/package.json; prints the
    // differences, one a line.
    const CHECK: &str = r#"
        const fs = require('fs');
        const lock = JSON.parse(fs.readFileSync('package-lock.json', 'utf8'));
        for (const [path, meta] of Object.entries(lock.packages || {})) {
            if (!path.startsWith('node_modules/') || meta.optional) continue;
            let have = 'missing';
            try { have = JSON.parse(fs.readFileSync(path + '/package.json', 'utf8')).version; } catch {}
            if (have !== meta.version) console.log(`${path.slice(13)} ${have}, locked ${meta.version}`);
        }
    "#;
    let stale = output(cmd("node").args(["-e", CHECK]).current_dir(&dir))
        .with_context(|| format!("checking {}/node_modules against package-lock.json", dir.display()))?;
    if stale.trim().is_empty() {
        println!("ok: {E2E_DIR}/node_modules matches package-lock.json");
        return Ok(());
    }
    println!(
        "installing: {E2E_DIR}/node_modules with npm ci ({})",
        stale.trim().lines().collect::<Vec<_>>().join("; ")
    );
    run(cmd("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .env("NPM_CONFIG_UPDATE_NOTIFIER", "false")
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"))
    .with_context(|| format!("installing the browser tests' npm packages in {}", dir.display()))?;
    let after = output(cmd("node").args(["-e", CHECK]).current_dir(&dir))?;
    if !after.trim().is_empty() {
        bail!("`npm ci` in {} succeeded but node_modules still differs from the lock: {}", dir.display(), after.trim());
    }
    Ok(())
}

/// schemathesis at its pinned version in its venv: created with Debian's python3 (not whatever
/// python3 comes first on PATH) and filled from PyPI unless it already has that version.
fn schemathesis() -> Result<()> {
    let venv = root().join(SCHEMATHESIS_VENV);
    let bin = venv.join("bin/schemathesis");
    let have = output(cmd(&bin).arg("--version")).unwrap_or_default();
    if have.split_whitespace().last() == Some(SCHEMATHESIS) {
        println!("ok: schemathesis {SCHEMATHESIS} in {SCHEMATHESIS_VENV}");
        return Ok(());
    }
    println!("installing: schemathesis {SCHEMATHESIS} into {SCHEMATHESIS_VENV} (PyPI)");
    let _ = std::fs::remove_dir_all(&venv);
    run(cmd("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))
        .context("creating the schemathesis venv (Debian's python3 and python3-venv)")?;
    run(cmd(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("schemathesis=={SCHEMATHESIS}"),
    ]))
    .context("installing schemathesis from PyPI")?;
    let after = output(cmd(&bin).arg("--version"))?;
    if after.split_whitespace().last() != Some(SCHEMATHESIS) {
        bail!("{} --version says {:?}, expected {SCHEMATHESIS}", bin.display(), after.trim());
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
    // clippy: `cargo xtask test` lints the eBPF crate too, built for its target.
    ensure_toolchain(&ebpf, &["rust-src".to_owned(), "clippy".to_owned()])?;
    Ok(())
}

/// `cargo clippy` on the eBPF crate with the eBPF toolchain, for the BPF target (as aya-build
/// builds it), in its own target directory; `-D warnings`.
pub fn ebpf_clippy() -> Result<std::process::Command> {
    let toolchain = tunmeter_metadata("ebpf-toolchain")?;
    let mut c = cmd("cargo");
    c.arg(format!("+{toolchain}"))
        .args(["clippy", "--package", "tunmeter-ebpf", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--release", "--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", crate::util::target_dir().join("ebpf-clippy"))
        .env("CARGO_ENCODED_RUSTFLAGS", format!("--cfg=bpf_target_arch=\"{ARCH}\""))
        .current_dir(root());
    Ok(c)
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

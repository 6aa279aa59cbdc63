//! Network-namespace helpers every lab uses: entering a named namespace or a fresh one on a
//! thread, running commands in one, creating them (`Namespaces`) and removing them by prefix,
//! cleanup from `Drop`.

use std::panic::AssertUnwindSafe;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

use crate::sys;

/// Check a lab prefix: 1..=8 chars of `[a-z0-9]`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() || prefix.len() > 8 || !prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        bail!("bad lab prefix {prefix:?}: need 1..=8 chars of [a-z0-9]");
    }
    Ok(())
}

/// Named network namespaces made for one lab or test: created with quiet IPv6 and `lo` up,
/// joined by veth pairs, deleted newest first by [`Namespaces::delete`] or on drop.
#[derive(Debug, Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    pub fn new() -> Namespaces {
        Namespaces::default()
    }

    /// Create `ns` (a leftover of that name is deleted first): no router advertisements, router
    /// solicitations or DAD, no IPv6 at all with `no_ipv6`; `lo` up.
    pub fn add(&mut self, ns: &str, no_ipv6: bool) -> Result<()> {
        if std::path::Path::new(&sys::netns_path(ns)).exists() {
            run("ip", &["netns", "delete", ns])?;
        }
        run("ip", &["netns", "add", ns])?;
        self.0.push(ns.to_string());
        init_ns(ns, no_ipv6)
    }

    /// A veth pair from `dev_a` in `ns_a` to `dev_b` in `ns_b`, each end with its address (CIDR,
    /// IPv4 or IPv6) and up.
    pub fn veth(ns_a: &str, dev_a: &str, addr_a: &str, ns_b: &str, dev_b: &str, addr_b: &str) -> Result<()> {
        run("ip", &["link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b])?;
        for (ns, dev, addr) in [(ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)] {
            let nodad: &[&str] = if addr.contains(':') { &["nodad"] } else { &[] };
            ipn(ns, &[&["addr", "add", addr, "dev", dev], nodad].concat())?;
            ipn(ns, &["link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// The namespaces, in creation order.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Delete the namespaces that still exist, newest first, adding failures to `errors`.
    pub fn delete(&mut self, errors: &mut Vec<String>) {
        for ns in self.0.drain(..).rev() {
            if std::path::Path::new(&sys::netns_path(&ns)).exists()
                && let Err(e) = run("ip", &["netns", "delete", &ns])
            {
                errors.push(format!("{e:#}"));
            }
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        self.delete(&mut errors);
        for e in errors {
            eprintln!("tunmeter-lab: {e}");
        }
    }
}

/// The end of a lab's cleanup: delete its namespaces, then whatever else its prefix left
/// (`cleanup_prefix`), and report every error collected.
pub(crate) fn finish_cleanup(
    what: &str,
    namespaces: &mut Namespaces,
    mut errors: Vec<String>,
    cleanup_prefix: impl FnOnce() -> Result<()>,
) -> Result<()> {
    namespaces.delete(&mut errors);
    if let Err(e) = cleanup_prefix() {
        errors.push(format!("{e:#}"));
    }
    if errors.is_empty() { Ok(()) } else { Err(anyhow!("{what} cleanup: {}", errors.join("; "))) }
}

/// A lab's cleanup run from `Drop`: failures and panics are reported on stderr, never unwound.
pub(crate) fn cleanup_on_drop(what: &str, cleanup: impl FnOnce() -> Result<()>) {
    match std::panic::catch_unwind(AssertUnwindSafe(cleanup)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("tunmeter-lab: {e:#}"),
        Err(_) => eprintln!("tunmeter-lab: panic during {what} cleanup"),
    }
}

/// True if this process runs as root (labs need it: namespaces, TUN, nftables).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run a closure on a fresh thread that has `setns()`'d into the network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let name = ns.to_string();
    let h = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            sys::enter_netns(&name)?;
            f()
        })
        .context("spawn netns thread")?;
    match h.join() {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(anyhow!("thread in netns {ns} panicked: {msg}"))
        }
    }
}

/// Run `f` on a fresh thread in a new, empty network namespace of its own (only `lo`, down: see
/// [`loopback_up`]) and return what it returns; a panic in `f` is raised again here. What
/// uses the calling thread's namespace (BPF_PROG_TEST_RUN, socket lookups, binds) sees nothing
/// of the host's.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        sys::unshare_netns().expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Bring `lo` up in the calling thread's network namespace.
pub fn loopback_up() -> Result<()> {
    sys::link_up("lo")
}

/// Run a command inside `ns` via `ip netns exec`; returns stdout, errors with stderr.
pub fn netns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// `ip -n ns args...`
pub(crate) fn ipn(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> Result<String> {
    run_stdin(cmd, args, None)
}

/// Run a command (optionally feeding `input` on stdin); stdout on success, error with stderr.
pub(crate) fn run_stdin(cmd: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("spawn {cmd} {}", args.join(" ")))?;
    // A failed write (the child exited early) shows up as a failed exit status below.
    let write_res = match (input, child.stdin.take()) {
        (Some(input), Some(mut stdin)) => stdin.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    write_res.with_context(|| format!("writing stdin of {cmd}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of existing namespaces `P-*`.
pub fn list_prefix(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    let rd = match std::fs::read_dir("/run/netns") {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("read /run/netns"),
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&start))
        .collect();
    v.sort();
    Ok(v)
}

/// Delete every namespace named `P-*` (leftovers of a lab with this prefix).
pub fn cleanup_prefix(prefix: &str) -> Result<()> {
    validate_prefix(prefix)?;
    let mut errors = Vec::new();
    for ns in list_prefix(prefix)? {
        if let Err(e) = run("ip", &["netns", "delete", &ns]) {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(anyhow!("{}", errors.join("; "))) }
}

/// Quiet IPv6 settings for a fresh namespace (no RAs, no router solicitations, no DAD; no IPv6
/// at all with `disable_ipv6`) and `lo` up.
fn init_ns(ns: &str, disable_ipv6: bool) -> Result<()> {
    in_netns(ns, move || {
        let mut settings = vec![("accept_ra", "0"), ("router_solicitations", "0"), ("accept_dad", "0")];
        if disable_ipv6 {
            settings.push(("disable_ipv6", "1"));
        }
        for (key, val) in settings {
            for scope in ["all", "default"] {
                let p = format!("/proc/sys/net/ipv6/conf/{scope}/{key}");
                std::fs::write(&p, val).with_context(|| format!("write {p}"))?;
            }
        }
        Ok(())
    })?;
    ipn(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

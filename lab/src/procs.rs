//! Child processes (OpenVPN, wireguard-go) running inside a lab namespace: spawn with
//! `nsenter --net`, bounded termination, pid files so a later run can end leftovers of a killed
//! lab (only processes whose command line names that lab).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys::netns_path;

/// A child process started by the lab, with its pid file. Terminated (SIGTERM, then SIGKILL)
/// on drop.
#[derive(Debug)]
pub(crate) struct LabProc {
    pub(crate) name: String,
    child: Child,
    pid_file: PathBuf,
}

impl LabProc {
    /// Run `program args..` inside the network namespace `ns` (`nsenter --net=/run/netns/ns`,
    /// which execs the program, so the child's pid is the program's), stdout and stderr appended
    /// to `log` (truncated first), pid written to `pid_file`.
    pub(crate) fn spawn(
        name: &str,
        ns: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
        pid_file: &Path,
    ) -> Result<LabProc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns_path(ns)))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in envs {
            c.env(k, v);
        }
        let child = c.spawn().with_context(|| format!("spawn {program} in {ns}"))?;
        std::fs::write(pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("write pid file {}", pid_file.display()))?;
        Ok(LabProc { name: name.to_string(), child, pid_file: pid_file.to_path_buf() })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait (bounded: 5 s more). Idempotent.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let status = terminate_child(&mut self.child, grace).with_context(|| format!("stopping {}", self.name));
        let _ = std::fs::remove_file(&self.pid_file);
        status
    }
}

impl Drop for LabProc {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(Duration::from_secs(3)) {
            eprintln!("tunmeter-lab: {e:#}");
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall; the pid is our own unreaped child (or a verified leftover).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn terminate_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(s) = child.try_wait()? {
        return Ok(s);
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("pid {} survived SIGKILL for 5 s", child.id())
}

/// Kill leftovers of an earlier run: for every `*.pid` file in `dir`, SIGKILL that pid if its
/// command line contains `marker` (so a recycled pid of an unrelated process is never touched),
/// wait until it is gone (bounded) and remove the pid file.
pub(crate) fn kill_leftovers(dir: &Path, marker: &str) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for entry in rd.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let pid: Option<u32> = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
        if let Some(pid) = pid.filter(|&p| p > 1)
            && cmdline_contains(pid, marker)
        {
            signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                // A leftover is not our child: init reaps it; we only wait for it to vanish.
                if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn cmdline_contains(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").contains(marker))
        .unwrap_or(false)
}

/// Poll `cond` every 50 ms until it returns `Ok(Some(v))`, an error, or `timeout` passes.
pub(crate) fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a log file (for error messages).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

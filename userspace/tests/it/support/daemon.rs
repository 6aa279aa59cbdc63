//! Running the real `tunmeter` binary inside a lab namespace, the way an operator would: start,
//! wait for a log line, stop with a signal, kill -9.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_tunmeter");

/// `tunmeter <args>` in network namespace `ns` (mount namespace unchanged, so /sys/fs/bpf is
/// the host's).
pub fn command(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(BIN).args(args).env("NO_COLOR", "1").env("RUST_LOG", "info");
    c
}

pub fn output(ns: &str, args: &[&str]) -> Output {
    command(ns, args).stdin(Stdio::null()).output().expect("run tunmeter")
}

/// A daemon process with its log in a file; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Start `tunmeter run <args>` and wait until it says it is counting.
    pub fn start(ns: &str, args: &[&str], log: &Path) -> Daemon {
        Daemon::start_with(command(ns, &[&["run"], args].concat()), log)
    }

    /// Start `c` (a `tunmeter run` command line, possibly wrapped by strace or setpriv) and wait
    /// until it says it is counting.
    pub fn start_with(mut c: Command, log: &Path) -> Daemon {
        let f = std::fs::File::options().create(true).append(true).open(log).unwrap();
        let child =
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(f)).spawn().expect("spawn tunmeter run");
        let mut d = Daemon { child: Some(child), log: log.to_owned() };
        d.wait_log("counting", 1 + d.log_text().matches("counting").count(), Duration::from_secs(20));
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `needle` appears `times` times in the log; panics with the log otherwise.
    pub fn wait_log(&mut self, needle: &str, times: usize, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.log_text().matches(needle).count() >= times {
                return t0.elapsed();
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("daemon exited ({st}) before logging {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no {needle:?} x{times} in the daemon log after {timeout:?}:\n{}", self.log_text());
    }

    /// The pid of the started process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.as_ref()?.id();
        self.stop_pid(pid)
    }

    /// SIGTERM to `pid` (the daemon itself, e.g. the child of a wrapping strace) and wait for
    /// the started process to exit; returns its exit status.
    pub fn stop_pid(&mut self, pid: u32) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

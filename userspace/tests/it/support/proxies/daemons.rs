//! Debian's tinyproxy (HTTP proxy) and dante (SOCKS5) as child processes in a namespace,
//! each with a minimal config, pid file and log of its own in a temp dir.

use super::*;

/// A proxy server process in a namespace; killed (with its children) on drop.
pub struct Proxy {
    pub name: &'static str,
    pub ns: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// tinyproxy (HTTP proxy, also CONNECT) on every address of `ns`, port `port`. No `Allow`
    /// line: every client is allowed.
    pub fn tinyproxy(ns: &str, port: u16) -> Proxy {
        let dir = temp_dir("tinyproxy");
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let text = format!(
            "Port {port}\nTimeout 30\nLogFile \"{log}\"\nLogLevel Info\nPidFile \"{pid}\"\nMaxClients 64\n\
             DisableViaHeader Yes\n",
            log = log.display(),
            pid = dir.join("tinyproxy.pid").display()
        );
        std::fs::write(&conf, text).unwrap();
        let conf_s = conf.display().to_string();
        // -d: foreground (it writes to its LogFile and, in the foreground, to stderr too).
        Proxy::spawn("tinyproxy", ns, port, dir, log, &["tinyproxy", "-d", "-c", &conf_s])
    }

    /// dante's `danted` (SOCKS5, no authentication, every client and destination allowed) on
    /// 0.0.0.0:`port` of `ns`, connecting out through `external` (an interface name of `ns`).
    pub fn danted(ns: &str, port: u16, external: &str) -> Proxy {
        let dir = temp_dir("danted");
        let log = dir.join("danted.log");
        let conf = dir.join("danted.conf");
        let text = format!(
            "logoutput: {log}\n\
             internal: 0.0.0.0 port = {port}\n\
             external: {external}\n\
             socksmethod: none\n\
             clientmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n\
             socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n",
            log = log.display()
        );
        std::fs::write(&conf, text).unwrap();
        let (conf_s, pid_s) = (conf.display().to_string(), dir.join("danted.pid").display().to_string());
        // Without -D danted stays in the foreground; -N 1: one main process.
        Proxy::spawn("danted", ns, port, dir, log, &["danted", "-f", &conf_s, "-p", &pid_s, "-N", "1"])
    }

    fn spawn(name: &'static str, ns: &str, port: u16, dir: PathBuf, log: PathBuf, argv: &[&str]) -> Proxy {
        let out = std::fs::File::create(dir.join("stdout-stderr.txt")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            // Own process group: drop kills the proxy's children too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} in {ns} (is it installed? `cargo xtask setup`): {e}"));
        let mut p = Proxy { name, ns: ns.to_string(), dir, log, child: Some(child) };
        if let Err(e) = wait_tcp_listening(ns, port, Duration::from_secs(10)) {
            let exited = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("{name} in {ns} does not listen on port {port} ({e:#}; exited: {exited:?}):\n{}", p.log_text());
        }
        p
    }

    /// Its log file and its stdout/stderr.
    pub fn log_text(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {}:\n{}--- stdout/stderr:\n{}",
            self.log.display(),
            read(&self.log),
            read(&self.dir.join("stdout-stderr.txt"))
        )
    }

    /// SIGTERM to the process group, SIGKILL after 3 s; wait for the main process.
    pub fn stop(&mut self) {
        use nix::{
            sys::signal::{Signal, killpg},
            unistd::Pid,
        };
        let Some(mut c) = self.child.take() else { return };
        let pgid = Pid::from_raw(c.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Children left behind (danted's) and a main process that did not stop.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = c.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "{} in {} (last lines):\n{}",
                self.name,
                self.ns,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

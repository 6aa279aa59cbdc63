//! The live client table: `tunmeter clients` with rates and `tunmeter sessions`, redrawn once a
//! second until Ctrl-C or the time is up.

use super::*;

impl Demo {
    pub(super) fn show_clients(&mut self, ns: &str, stop: &AtomicBool, seconds: Option<u64>) -> Result<()> {
        let tty = std::io::stdout().is_terminal();
        let start = Instant::now();
        let mut next = start;
        while !stop.load(Ordering::Relaxed) {
            if let Some(status) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the daemon exited ({status}); {}", log_tail(&daemon_log()));
            }
            if let Some(status) = self.lab.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the lab exited ({status}); {}", log_tail(&lab_log()));
            }

            let mut c = in_netns(ns, &self.daemon_bin);
            c.args(daemon_clients_args()).stdin(Stdio::null()).process_group(0);
            let what = describe(&c);
            let out = c.output().with_context(|| format!("running `{what}`"))?;

            let elapsed = start.elapsed().as_secs();
            let mut screen = String::new();
            if tty {
                screen.push_str("\x1b[2J\x1b[H");
            } else {
                screen.push_str("----\n");
            }
            let until = match seconds {
                Some(n) => format!("stops after {n} s"),
                None => "Ctrl-C to stop".to_owned(),
            };
            screen.push_str(&format!("tunmeter demo: server netns {ns}, {elapsed} s, {until}\n"));
            screen.push_str(&format!(
                "dashboard: {}  admin token: {}\n$ {what}\n\n",
                self.dashboard_url(),
                self.token.as_deref().unwrap_or_default()
            ));
            screen.push_str(&String::from_utf8_lossy(&out.stdout));
            let mut c = in_netns(ns, &self.daemon_bin);
            c.args(daemon_sessions_args(&state_dir())).stdin(Stdio::null()).process_group(0);
            if let Ok(sessions) = c.output()
                && sessions.status.success()
            {
                screen.push_str(&format!("\n$ {}\n", describe(&c)));
                screen.push_str(&String::from_utf8_lossy(&sessions.stdout));
            }
            if !out.status.success() && start.elapsed() < DAEMON_START_GRACE {
                screen.push_str("(waiting for the daemon to load and pin its maps)\n");
            } else if !out.status.success() {
                screen.push_str(&format!(
                    "\n(`tunmeter clients` failed: {})\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(screen.as_bytes())?;
            stdout.flush()?;
            drop(stdout);

            if seconds.is_some_and(|n| elapsed >= n) {
                break;
            }
            next += REFRESH;
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

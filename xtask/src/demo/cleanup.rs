//! Stopping the demo in order (relay, daemon, detach, lab), removing leftovers of an earlier
//! run, and checking that no namespace and no pin is left.

use super::*;

impl Demo {
    /// Stops everything in order: daemon, detach, lab, `lab down`; then checks that no
    /// namespace and no pin is left. Keeps going after failures and reports them all.
    pub(super) fn cleanup(&mut self) -> Result<()> {
        let mut problems = Vec::new();

        if let Some(relay) = self.relay.take() {
            println!("demo: closing the dashboard relay");
            relay.stop();
        }

        if let Some(daemon) = self.daemon.take() {
            println!("demo: stopping the daemon (SIGTERM)");
            if let Err(e) = stop_child(daemon, DAEMON_STOP_TIMEOUT) {
                problems.push(format!("stopping the daemon: {e:#}"));
            }
        }

        if let Some(ns) = &self.ns
            && Path::new(&netns_path(ns)).exists()
        {
            let mut c = in_netns(ns, &self.daemon_bin);
            c.args(daemon_detach_args(&state_dir())).stdin(Stdio::null());
            let what = describe(&c);
            println!("demo: detaching: {what}");
            if let Err(e) = run(&mut c) {
                // Only a problem if pins stay behind; checked below.
                eprintln!("demo: warning: {e:#}");
            }
        }

        if let Some(lab) = self.lab.take() {
            println!("demo: stopping the lab (SIGTERM)");
            if let Err(e) = stop_child(lab, LAB_STOP_TIMEOUT) {
                problems.push(format!("stopping the lab: {e:#}"));
            }
        }
        if let Some(reader) = self.lab_reader.take() {
            let _ = reader.join();
        }

        // Safety net, whatever happened above.
        if let Err(e) = self.lab_down() {
            eprintln!("demo: warning: {e:#}");
        }
        if Path::new(PIN_DIR).exists() {
            eprintln!("demo: warning: {PIN_DIR} still exists after detach; removing it");
            if let Err(e) = std::fs::remove_dir_all(PIN_DIR) {
                problems.push(format!("removing {PIN_DIR}: {e}"));
            }
        }

        let left = leftovers();
        if !left.is_empty() {
            problems.push(format!("left behind: {}", left.join(", ")));
        }
        if problems.is_empty() { Ok(()) } else { Err(anyhow!("{}", problems.join("; "))) }
    }

    pub(super) fn lab_down(&self) -> Result<()> {
        let mut c = cmd(&self.lab_bin);
        c.args(lab_down_args()).stdin(Stdio::null());
        println!("demo: {}", describe(&c));
        run(&mut c)
    }

    /// Removes what an earlier, killed demo run may have left.
    pub(super) fn clean_leftovers(&self) {
        if leftovers().is_empty() {
            return;
        }
        println!("demo: cleaning up leftovers of an earlier run: {}", leftovers().join(", "));
        if let Err(e) = self.lab_down() {
            eprintln!("demo: warning: {e:#}");
        }
        if Path::new(PIN_DIR).exists()
            && let Err(e) = std::fs::remove_dir_all(PIN_DIR)
        {
            eprintln!("demo: warning: removing {PIN_DIR}: {e}");
        }
    }
}

/// Network namespaces with the demo's prefix and the demo's pin directory, if they exist.
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(LAB_PREFIX) {
                left.push(format!("netns {name}"));
            }
        }
    }
    if Path::new(PIN_DIR).exists() {
        left.push(PIN_DIR.to_owned());
    }
    left
}

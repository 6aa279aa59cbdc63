//! The dashboard in real headless Chromium (Debian's `chromium`, driven by Playwright from
//! `web/e2e/dashboard.mjs`) against the real daemon, with real traffic in the namespace lab.
//!
//! Node and Chromium run inside the lab's server namespace, next to the daemon, and talk to it on
//! that namespace's loopback. The namespace has no route to the internet, so this also shows that
//! the dashboard needs none. The script logs in with a read token (live rates move; resetting is
//! refused with 403; the registry forms are disabled) and then with an admin token (history chart;
//! reset with confirmation zeroes the row; a device, and http, socks5 and openvpn connections
//! created through the forms and checked against the API; a duplicate public port answered with
//! the 409 message; a connection deleted with confirmation; a session opened through the API shows
//! its username in the client table, the device's client row shows the device), saves a
//! screenshot to `target/dashboard.png`, and logs in with the read token again: the tampered forms
//! get the server's 403 message.

use crate::support;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{
    PinDir,
    daemon::{self, Daemon},
    require_root,
};
use tunmeter_lab::{Lab, LabConfig, traffic};

const API: &str = "127.0.0.1:9107";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(210);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set, else the directory holding this test
/// binary that carries cargo's `CACHEDIR.TAG`, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() { d } else { workspace_root().join(d) };
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().find(|a| a.join("CACHEDIR.TAG").is_file()).map(Path::to_owned))
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `tunmeter token create --role ROLE`: the token is the last line on stdout.
fn create_token(ns: &str, role: &str, state: &str) -> String {
    let out = daemon::output(
        ns,
        &[
            "token",
            "create",
            "--role",
            role,
            "--name",
            &format!("e2e-{role}"),
            "--state-dir",
            state,
            "--node-id",
            "dash",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tunmeter token create --role {role} failed ({}):\n{}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let token = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string();
    assert!(token.starts_with("tm_"), "token create printed {stdout:?}, expected a token tm_... on the last line");
    token
}

/// What the script needs; a missing piece fails the test with the command that installs it.
fn check_prerequisites(e2e: &Path, chromium: &Path) {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is not installed (Debian 12: nodejs 18 or newer); run `cargo xtask setup`"
    );
    assert!(chromium.is_file(), "{} is missing: run `cargo xtask setup` (Debian package chromium)", chromium.display());
    assert!(
        e2e.join("node_modules/playwright-core/package.json").is_file(),
        "{} has no node_modules/playwright-core: run `cargo xtask setup` (npm ci in web/e2e)",
        e2e.display()
    );
}

/// Run `cmd` with a time limit in its own process group (Chromium included); returns
/// (exit status or None on timeout, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<std::process::ExitStatus>, String, String) {
    use std::os::unix::process::CommandExt as _;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn nsenter node");
    let pipe = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for node") {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

#[test]
fn dashboard_in_real_chromium() {
    if !require_root() {
        return;
    }
    let root = workspace_root();
    let e2e = root.join("web/e2e");
    let chromium = PathBuf::from(std::env::var("TUNMETER_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    check_prerequisites(&e2e, &chromium);

    let lab = Lab::up(LabConfig { prefix: "tmdash".into(), tun_clients: 3, eth_clients: 1 }).expect("lab up");
    let ns = lab.server_ns();
    let pins = PinDir::new("dash");
    let (state, log) = support::env::daemon_paths("dash");
    let state_s = state.display().to_string();

    let admin = create_token(&ns, "admin", &state_s);
    let read = create_token(&ns, "read", &state_s);

    let pin_s = pins.path().display().to_string();
    #[rustfmt::skip]
    let args = [
        "--tun", "tun0", "--egress", "eth0",
        "--subnet", "10.8.0.0/24", "--subnet", "fd00:8::/64", "--subnet", "10.9.0.0/24", "--subnet", "fd00:9::/64",
        "--pin-dir", &pin_s, "--state-dir", &state_s, "--node-id", "dash", "--api-listen", API,
        // History reaches the database within a second, so the chart has bars quickly.
        "--flush-interval-ms", "1000",
    ];
    let mut d = Daemon::start(&ns, &args, &log);
    d.wait_log("API listening", 1, Duration::from_secs(20));
    let bg = traffic::background(&lab, Duration::from_millis(500)).expect("background traffic");

    // The clients whose traffic the script watches: every tun client (v4), one v6, the Ethernet one.
    let mut expect: Vec<String> = lab.tun_clients().iter().map(|c| c.v4.to_string()).collect();
    expect.push(lab.tun_clients()[0].v6.to_string());
    expect.extend(lab.eth_clients().iter().map(|c| c.v4.to_string()));

    // One client becomes a device through the form, another gets a session through the API.
    let device_client = lab.tun_clients()[1].v4.to_string();
    let session_client = lab.tun_clients()[2].v4.to_string();

    let shot = target_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("node")
        .arg(e2e.join("dashboard.mjs"))
        .current_dir(&e2e)
        .env("TUNMETER_URL", format!("http://{API}"))
        .env("TUNMETER_ADMIN_TOKEN", &admin)
        .env("TUNMETER_READ_TOKEN", &read)
        .env("TUNMETER_SCREENSHOT", &shot)
        .env("TUNMETER_EXPECT_CLIENTS", expect.join(","))
        .env("TUNMETER_DEVICE_CLIENT", &device_client)
        .env("TUNMETER_SESSION_CLIENT", &session_client)
        .env("TUNMETER_CHROMIUM", &chromium)
        .env("TUNMETER_E2E_TIMEOUT_MS", (SCRIPT_TIMEOUT - Duration::from_secs(10)).as_millis().to_string());
    let t0 = Instant::now();
    let (status, stdout, stderr) = run_bounded(cmd, SCRIPT_TIMEOUT);
    let took = t0.elapsed();
    let traffic = bg.stop();
    eprintln!("{stderr}");
    let daemon_log = d.log_text();
    d.stop();

    let Some(status) = status else {
        panic!("dashboard.mjs did not finish within {SCRIPT_TIMEOUT:?}:\n{stderr}\n--- daemon log ---\n{daemon_log}");
    };
    assert!(
        status.success(),
        "dashboard.mjs failed ({status}) after {took:.1?}:\n{stderr}{stdout}\n--- daemon log ---\n{daemon_log}"
    );
    assert!(traffic.rounds > 0, "the lab sent no traffic: {traffic:?}");
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary on stdout: {stdout:?}"));
    assert_eq!(summary["ok"], true, "{summary}");
    // The reset zeroed the row: the closed period holds at least what was shown before it, and the
    // new period started below that.
    let r = &summary["reset"];
    for dir in ["upBytes", "downBytes"] {
        let get = |k: &str| r[k][dir].as_u64().unwrap_or_else(|| panic!("summary lacks reset.{k}.{dir}: {summary}"));
        let (before, closed, after) = (get("before"), get("closed"), get("after"));
        assert!(closed >= before && after < before, "{dir}: before {before}, closed {closed}, after {after}");
    }

    // The registry as the script read it back from the API (GET /api/v1/connections, devices).
    let reg = &summary["registry"];
    assert_eq!(reg["device"]["vpn_ip"], device_client.as_str(), "{summary}");
    assert_eq!(reg["device"]["name"], "e2e-phone", "{summary}");
    let conns =
        reg["connections"].as_array().unwrap_or_else(|| panic!("summary lacks registry.connections: {summary}"));
    let has =
        |proto: &str, f: &dyn Fn(&serde_json::Value) -> bool| conns.iter().any(|c| c["protocol"] == proto && f(c));
    assert!(has("http", &|c| c["public_port"] == 18080 && c["device_port"] == 3128 && c["rule"].is_u64()), "{summary}");
    assert!(
        has("socks5", &|c| c["public_port"] == 18081 && c["device_port"] == 1080 && c["rule"].is_u64()),
        "{summary}"
    );
    assert!(has("openvpn", &|c| c["username"] == "e2e-alice" && c["proxy_port"] == 12345), "{summary}");
    assert_eq!(reg["conflict"]["status"], 409, "{summary}");
    assert_eq!(reg["deleted"]["protocol"], "socks5", "{summary}");
    assert!(reg["device_delete_refused"].as_str().is_some_and(|m| m.contains("HTTP 409")), "{summary}");
    assert_eq!(reg["deleted"]["remaining"], 2, "{summary}");
    assert_eq!(reg["session"]["client_ip"], session_client.as_str(), "{summary}");
    assert_eq!(reg["session_row"][1], "carol", "the client table's username cell: {summary}");
    assert_eq!(reg["device_client_row"][9], "e2e-phone (self)", "the client table's device cell: {summary}");
    assert_eq!(summary["read_forms"]["status"], 403, "{summary}");

    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", shot.display());
    let (w, h) =
        (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert!(w >= 1000 && h >= 600 && png.len() > 20_000, "screenshot {w}x{h}, {} bytes: looks empty", png.len());
    eprintln!("dashboard e2e passed in {took:.1?}; screenshot {} ({w}x{h}); summary: {summary}", shot.display());

    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&log);
    drop(lab);
}

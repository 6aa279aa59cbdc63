//! The lab of section 3: the real `tunmeter run` in a namespace of its own (persistent tun,
//! own pins and state, default SQLite ledger), an API client on a thread in that namespace,
//! the writer that bumps N client entries every second, and per-process CPU and memory figures.

use super::*;

pub(super) const API_ADDR: &str = "127.0.0.1:9107";
pub(super) const NODE_ID: &str = "bench";
pub(super) const DAEMON_MAX_CLIENTS: &str = "131072";

/// The daemon's `--max-clients` for `n` clients: DAEMON_MAX_CLIENTS, or room for 1,000,000.
fn max_clients(n: u32) -> String {
    let room = (n as u64 * 5 / 4).next_power_of_two().max(131_072);
    room.to_string()
}

/// The daemon in its own namespace; on drop (panic included): SIGTERM (SIGKILL after 30 s),
/// `tunmeter detach`, the namespace and the state directory removed.
pub(super) struct DaemonLab {
    pub(super) ns: String,
    pub(super) namespaces: tunmeter_lab::Namespaces,
    pub(super) pins: support::PinDir,
    pub(super) state: std::path::PathBuf,
    pub(super) daemon: Option<std::process::Child>,
    pub(super) token: String,
}

impl DaemonLab {
    /// The daemon for `clients` clients, on `database_url` (None: the default SQLite file in
    /// its state directory).
    pub(super) fn start(tag: &str, clients: u32, database_url: Option<&str>) -> DaemonLab {
        let ns = format!("tmbd-{tag}-{}", std::process::id());
        let state = std::path::PathBuf::from(format!("/tmp/tmbench-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut lab = DaemonLab {
            ns,
            namespaces: tunmeter_lab::Namespaces::new(),
            pins: support::PinDir::new(&format!("daemon-{tag}")),
            state,
            daemon: None,
            token: String::new(),
        };
        lab.namespaces.add(&lab.ns, false).unwrap();
        // A persistent tun device: layer 3 (link type "none"), as the daemon's --tun needs.
        sh(&["ip", "-n", &lab.ns, "tuntap", "add", "dev", "tun0", "mode", "tun"]);
        sh(&["ip", "-n", &lab.ns, "link", "set", "tun0", "up"]);
        std::fs::create_dir_all(&lab.state).unwrap();
        let log = std::fs::File::create(lab.log()).unwrap();
        let mut c = lab.tunmeter(&["run", "--tun", "tun0", "--subnet", "10.0.0.0/8", "--subnet", "fd00::/8"]);
        c.args(["--max-clients", &max_clients(clients), "--node-id", NODE_ID, "--api-listen", API_ADDR]);
        if let Some(url) = database_url {
            c.args(["--database-url", url]);
        }
        c.arg("--pin-dir")
            .arg(lab.pins.path())
            .arg("--state-dir")
            .arg(&lab.state)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        lab.daemon = Some(c.spawn().expect("spawn tunmeter run"));
        lab.wait_log("API listening", Duration::from_secs(30));
        // nsenter execs tunmeter: the child's pid is the daemon's.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", lab.pid())).unwrap_or_default();
        assert_eq!(comm.trim(), "tunmeter", "pid {} is the daemon", lab.pid());
        let mut token = lab.tunmeter(&["token", "create", "--role", "read", "--name", "bench", "--node-id", NODE_ID]);
        token.arg("--state-dir").arg(&lab.state);
        if let Some(url) = database_url {
            token.args(["--database-url", url]);
        }
        let out = token.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        lab.token = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string();
        assert!(lab.token.starts_with("tm_"), "token create printed {stdout:?}");
        lab
    }

    /// `tunmeter ARGS` in the namespace (mount namespace unchanged, so /sys/fs/bpf is ours).
    pub(super) fn tunmeter(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(env!("CARGO_BIN_EXE_tunmeter"))
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        c
    }

    pub(super) fn log(&self) -> std::path::PathBuf {
        self.state.join("daemon.log")
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    pub(super) fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon started").id()
    }

    pub(super) fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let t0 = std::time::Instant::now();
        while !self.log_text().contains(needle) {
            if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the daemon exited ({st}) before logging {needle:?}:\n{}", self.log_text());
            }
            assert!(t0.elapsed() < timeout, "no {needle:?} in the daemon log after {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` with an API client on a thread inside the daemon's namespace.
    pub(super) fn api<T: Send + 'static>(&self, f: impl FnOnce(&Api) -> T + Send + 'static) -> T {
        let token = self.token.clone();
        tunmeter_lab::in_netns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // No proxy from the environment: the daemon is on this namespace's loopback.
            let client = reqwest::Client::builder().no_proxy().build()?;
            Ok(f(&Api { rt, client, token }))
        })
        .expect("API thread")
    }
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t0 = std::time::Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut detach = self.tunmeter(&["detach"]);
        detach.arg("--pin-dir").arg(self.pins.path()).arg("--state-dir").arg(&self.state);
        let _ = detach.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.state);
        // The namespace goes with `self.namespaces`, the pin directory (if detach left it) with
        // `self.pins`.
    }
}

/// A blocking HTTP client of the daemon's API, on a thread in its namespace.
pub(super) struct Api {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) client: reqwest::Client,
    pub(super) token: String,
}

impl Api {
    /// GET `path` with the bearer token: status and body.
    pub(super) fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let r = self
                .client
                .get(format!("http://{API_ADDR}{path}"))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap_or_else(|e| panic!("GET {path}: body: {e}")).to_vec())
        })
    }

    /// GET `path` to its last body byte, without copying the body: status and body length.
    pub(super) fn get_len(&self, path: &str) -> (u16, usize) {
        self.rt.block_on(async {
            let r = self.client.get(format!("http://{API_ADDR}{path}")).bearer_auth(&self.token).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().len())
        })
    }

    pub(super) fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// Writes `n` client entries (10.1.0.0 and up) into the daemon's pinned client map and bumps
/// every one of them once a second (upload and download, last seen = now) until dropped.
pub(super) struct Traffic {
    pub(super) stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The time each round of `n` map updates took.
    pub(super) thread: Option<std::thread::JoinHandle<Vec<Duration>>>,
}

impl Traffic {
    pub(super) fn start(pins: &std::path::Path, n: u32) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let pins = pins.to_owned();
        let clock = tunmeter::bpf::clock::KernelClock::open(&pins).expect("the daemon's clock program");
        let thread = std::thread::spawn(move || {
            let maps = tunmeter::bpf::loader::PinnedMaps::new(&pins);
            let mut alloc = tunmeter::bpf::slots::SlotAlloc::open(&maps).expect("the daemon's client slots");
            // Every client takes its slot as its first packet would.
            let slots: Vec<u32> = (0..n)
                .map(|i| {
                    let key = tunmeter_common::ClientKey::v4((0x0a01_0000u32 + i).to_be_bytes());
                    alloc.admit(&key).expect("a free slot").expect("not reserved").0
                })
                .collect();
            let mut rounds = Vec::new();
            let mut next = std::time::Instant::now();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = std::time::Instant::now();
                let now = clock.jiffies().unwrap();
                let c = ClientCounters {
                    up_bytes: 1000,
                    up_packets: 2,
                    down_bytes: 5000,
                    down_packets: 4,
                    last_seen_jiffies: now,
                };
                // What the program's atomic adds do for a client's packets of the last second.
                for &slot in &slots {
                    alloc.slots().add(slot, &c);
                }
                rounds.push(t0.elapsed());
                next += Duration::from_secs(1);
                while std::time::Instant::now() < next && !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            rounds
        });
        Traffic { stop, thread: Some(thread) }
    }

    /// Stop; the slowest round of counter updates.
    pub(super) fn stop(mut self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = self.thread.take().unwrap().join().expect("traffic thread");
        rounds.into_iter().max().unwrap_or_default()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> u64 {
    try_cpu_ticks(pid).unwrap_or_else(|| panic!("no /proc/{pid}/stat"))
}

/// `cpu_ticks`, or None if the process is gone.
pub(super) fn try_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": the 3rd field (state) first; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A `Vm...:` line of /proc/PID/status, in MiB.
pub(super) fn vm_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in status"));
    let kb: f64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
    kb / 1024.0
}

/// CPU ticks per thread name (digits stripped: "sqlx-sqlite-worker-0" -> "sqlx-sqlite-worker-"),
/// over the threads alive now.
pub(super) fn thread_ticks(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        *by_name.entry(name).or_default() += ticks;
    }
    by_name
}

/// Clock ticks per second of utime/stime.
pub(super) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

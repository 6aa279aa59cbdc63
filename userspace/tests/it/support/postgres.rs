//! A throwaway PostgreSQL server for one test: its own cluster (initdb) in a temporary
//! directory, listening on 127.0.0.1 on a free port, stopped and removed on drop.
//!
//! The binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/<major>/bin`,
//! highest major; `cargo xtask setup` installs it). The distro's own cluster (`15/main` on port
//! 5432, which the package may create) is never used. As root, the server runs as the
//! `postgres` OS user, because PostgreSQL refuses to run as root; as any other user it runs as
//! that user. Several tests of one binary can each start their own server in parallel.
//!
//! The API is blocking (it runs `pg_ctl`): call it from a synchronous test, or from an async
//! test between awaits (it blocks that thread for up to a few seconds).

use std::{
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Bound for `pg_ctl -w` (start and stop), in seconds.
const PG_CTL_TIMEOUT_SECS: u32 = 30;
/// Ports tried before giving up when the server cannot listen on a freshly picked one.
const PORT_ATTEMPTS: usize = 5;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True if the PostgreSQL server binaries are installed. Without them, a test that needs a
/// server fails under `cargo xtask test` (TUNMETER_REQUIRE_ROOT_TESTS=1) and otherwise skips
/// with a message, like `support::require_root()`.
pub fn require_postgres() -> bool {
    if bin_dir().is_some() {
        return true;
    }
    if std::env::var_os("TUNMETER_REQUIRE_ROOT_TESTS").is_some() {
        panic!(
            "this test needs the PostgreSQL server binaries in /usr/lib/postgresql/<major>/bin: \
             run `cargo xtask setup` (Debian package postgresql)"
        );
    }
    eprintln!("skipped: needs the PostgreSQL server binaries (run `cargo xtask setup`)");
    false
}

/// `/usr/lib/postgresql/<major>/bin` of the highest major version that has `pg_ctl` and
/// `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("pg_ctl").is_file() && bin.join("initdb").is_file()).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The OS user the server runs as: `Some((uid, gid))` of `postgres` when we are root,
/// `None` (ourselves) otherwise.
fn server_user() -> Option<(u32, u32)> {
    if !tunmeter_lab::is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("looking up the `postgres` OS user")
        .expect("no `postgres` OS user (the Debian package postgresql-common creates it): run `cargo xtask setup`");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
fn pick_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to pick a port");
    l.local_addr().unwrap().port()
}

pub struct Postgres {
    bin: PathBuf,
    /// Owned by the server's user: `data/` (the cluster), the socket and `server.log`.
    dir: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    running: bool,
}

impl Postgres {
    /// initdb a new cluster and start it on a free port. Panics (with the server log's tail)
    /// if that fails.
    pub fn start_new() -> Postgres {
        let bin = bin_dir()
            .expect("no PostgreSQL server binaries in /usr/lib/postgresql/<major>/bin: run `cargo xtask setup`");
        let user = server_user();
        // /tmp as root: $TMPDIR could be somewhere the postgres user cannot reach.
        let base = if user.is_some() { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "tunmeter-pg-{}-{}-{nanos:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut pg = Postgres { bin, dir, port: 0, user, running: false };
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown postgres {}: {e}", pg.dir.display()));
        }
        std::fs::set_permissions(&pg.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();

        let out = run_output(pg.tool("initdb").arg("-D").arg(pg.data_dir()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]));
        if !out.status.success() {
            panic!("initdb in {} failed ({}):\n{}", pg.dir.display(), out.status, text(&out));
        }

        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            pg.port = pick_port();
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start on any of {PORT_ATTEMPTS} ports; last attempt:\n{last}");
    }

    /// The same server through its unix socket, which processes in other network namespaces
    /// (a daemon in a lab namespace) can reach.
    pub fn socket_url(&self) -> String {
        self.socket_db_url("postgres")
    }

    /// Database `db` of this server through its unix socket.
    pub fn socket_db_url(&self, db: &str) -> String {
        format!("postgres://postgres@localhost/{db}?host={}&port={}", self.dir.display(), self.port)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.db_url("postgres")
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>`
    pub fn db_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The server's log file (appended to across stops and starts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no server log: {e})"));
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Creates database `name` (with `createdb`) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}: use letters, digits and _"
        );
        assert!(self.running, "create_database({name:?}) while the server is stopped");
        let mut c = Command::new(self.bin.join("createdb"));
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-w", name]);
        let out = run_output(&mut c);
        if !out.status.success() {
            panic!("createdb {name} on port {} failed ({}):\n{}", self.port, out.status, text(&out));
        }
        self.db_url(name)
    }

    /// Stops the server (`pg_ctl stop -m fast`: open connections are closed), keeping the
    /// cluster and the port for [`Postgres::start`]. For tests where the database goes down.
    pub fn stop(&mut self) {
        assert!(self.running, "stop() while the server is already stopped");
        let out = self.pg_ctl_stop("fast");
        if !out.status.success() {
            panic!("pg_ctl stop failed ({}):\n{}\nserver log:\n{}", out.status, text(&out), self.log_tail(30));
        }
        self.running = false;
    }

    /// Starts the stopped server again, with the same data and port (so URLs stay valid).
    /// Retries for a few seconds if the port is briefly taken.
    pub fn start(&mut self) {
        assert!(!self.running, "start() while the server is running");
        let mut last = String::new();
        for attempt in 0..PORT_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start again on port {} ({PORT_ATTEMPTS} attempts); last:\n{last}", self.port);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `pg_ctl start -w`; on failure, the server is not running and the error holds pg_ctl's
    /// output and the log tail.
    fn try_start(&mut self) -> Result<(), String> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let out = run_output(
            self.tool("pg_ctl")
                .args(["start", "-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-o", &opts]),
        );
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        // A server that came up too late for -w would hold the data dir: stop it before
        // trying again.
        let _ = self.pg_ctl_stop("immediate");
        Err(format!(
            "pg_ctl start on port {} ({}) failed ({}):\n{}\nserver log ({}):\n{}",
            self.port,
            self.dir.display(),
            out.status,
            text(&out),
            self.log_path().display(),
            self.log_tail(30)
        ))
    }

    fn pg_ctl_stop(&self, mode: &str) -> Output {
        run_output(
            self.tool("pg_ctl")
                .args(["stop", "-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-m", mode, "-D"])
                .arg(self.data_dir()),
        )
    }

    /// A server-side tool, run as the server's user from the cluster's directory.
    fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        c.current_dir(&self.dir);
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql").env("USER", "postgres").env("LOGNAME", "postgres");
        }
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let out = self.pg_ctl_stop("immediate");
            if !out.status.success() {
                eprintln!("warning: stopping the test PostgreSQL on port {} failed:\n{}", self.port, text(&out));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `c` with no stdin and captured output, without the PG* variables of the environment
/// (a PGHOST or PGDATA there must not redirect the tools).
fn run_output(c: &mut Command) -> Output {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PG")) {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {:?}: {e}", c.get_program()))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

//! The management client (`identity::openvpn::mgmt::run_instance`) against a real OpenVPN 2.6
//! management interface in throwaway network namespaces.
//!
//! `identity::openvpn::mgmt::run_instance` against a REAL OpenVPN 2.6 management interface:
//! a server (and a client) in throwaway network namespaces, certificates made with the
//! `openssl` CLI. Covers password login, the ESTABLISHED notification triggering a snapshot,
//! the management interface going away and coming back, a wrong or missing password, a
//! multi-line password (only its first line is sent), a unix socket, the reconcile interval,
//! and stopping when the receiver is dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tunmeter::{
    config::{MgmtAddr, OpenvpnInstance},
    identity::openvpn::mgmt::{MgmtEvent, run_instance},
};
use tunmeter_lab::Namespaces;

use crate::support::require_root;

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(out.status.success(), "`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Namespaces, a scratch directory and the OpenVPN processes of one test; all removed on drop.
struct Lab {
    dir: PathBuf,
    namespaces: Namespaces,
    procs: Vec<(String, Child)>,
}

impl Lab {
    /// `<p>-s` (server, 10.96.x.1) and optionally `<p>-c` (client, .2) joined by a veth pair.
    fn new(prefix: &str, subnet: u8, with_client: bool) -> Lab {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (s, c) = (format!("{prefix}-s"), format!("{prefix}-c"));
        let mut lab = Lab { dir, namespaces: Namespaces::new(), procs: vec![] };
        lab.namespaces.add(&s, false).unwrap();
        if with_client {
            lab.namespaces.add(&c, false).unwrap();
            let (vs, vc) = (format!("{prefix}vs"), format!("{prefix}vc"));
            let (a, b) = (format!("10.96.{subnet}.1/24"), format!("10.96.{subnet}.2/24"));
            Namespaces::veth(&s, &vs, &a, &c, &vc, &b).unwrap();
        }
        lab.make_pki();
        lab
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn make_pki(&self) {
        let d = |n: &str| self.path(n);
        std::fs::write(
            d("ext.cnf"),
            "[srv]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\n\
             [cli]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        sh("openssl", &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &d("ca.key")]);
        sh(
            "openssl",
            &["req", "-x509", "-new", "-key", &d("ca.key"), "-days", "2", "-subj", "/CN=ha-ca", "-out", &d("ca.crt")],
        );
        for (name, ext) in [("server", "srv"), ("client1", "cli")] {
            let (key, csr, crt) = (d(&format!("{name}.key")), d(&format!("{name}.csr")), d(&format!("{name}.crt")));
            sh("openssl", &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
            sh("openssl", &["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr]);
            #[rustfmt::skip]
            sh("openssl", &["x509", "-req", "-in", &csr, "-CA", &d("ca.crt"), "-CAkey", &d("ca.key"), "-CAcreateserial",
                "-days", "2", "-extfile", &d("ext.cnf"), "-extensions", ext, "-out", &crt]);
        }
        std::fs::write(d("up.txt"), "alice\nsecret\n").unwrap();
        std::fs::write(d("ok.sh"), "#!/bin/sh\nexit 0\n").unwrap();
        sh("chmod", &["+x", &d("ok.sh")]);
    }

    /// Start an OpenVPN server in `<p>-s` with the given management line; UDP on 1194.
    fn start_server(&mut self, tag: &str, dev: &str, management: &str) {
        let d = |n: &str| self.path(n);
        let conf = format!(
            "dev {dev}\ndev-type tun\nproto udp\nport 1194\ntopology subnet\nserver 10.95.0.0 255.255.255.0\n\
             ca {}\ncert {}\nkey {}\ndh none\n{management}\nscript-security 2\n\
             auth-user-pass-verify {} via-file\nkeepalive 10 60\nverb 3\n",
            d("ca.crt"),
            d("server.crt"),
            d("server.key"),
            d("ok.sh"),
        );
        let file = d(&format!("{tag}.conf"));
        std::fs::write(&file, conf).unwrap();
        let ns = self.namespaces.names()[0].clone();
        self.spawn(tag, &ns, &["openvpn", "--config", &file, "--log", &d(&format!("{tag}.log"))]);
    }

    fn start_client(&mut self, tag: &str, subnet: u8) {
        let d = |n: &str| self.path(n);
        let conf = format!(
            "client\ndev hacl0\ndev-type tun\nproto udp\nremote 10.96.{subnet}.1 1194\nca {}\ncert {}\nkey {}\n\
             auth-user-pass {}\nnobind\nverb 3\n",
            d("ca.crt"),
            d("client1.crt"),
            d("client1.key"),
            d("up.txt"),
        );
        let file = d(&format!("{tag}.conf"));
        std::fs::write(&file, conf).unwrap();
        let ns = self.namespaces.names()[1].clone();
        self.spawn(tag, &ns, &["openvpn", "--config", &file, "--log", &d(&format!("{tag}.log"))]);
    }

    fn spawn(&mut self, tag: &str, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.push((tag.to_string(), child));
    }

    fn kill(&mut self, tag: &str) {
        let i = self.procs.iter().position(|(t, _)| t == tag).unwrap_or_else(|| panic!("no process {tag}"));
        let (_, mut child) = self.procs.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log(&self, tag: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{tag}.log"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespaces go with `self.namespaces`.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next event within `within`, or panic with `what`.
async fn next(rx: &mut mpsc::Receiver<MgmtEvent>, within: Duration, what: &str) -> MgmtEvent {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("{what}: the instance task ended"),
        Err(_) => panic!("{what}: nothing within {within:?}"),
    }
}

/// Skip events until `pred` matches (within `within` overall).
async fn wait_for(
    rx: &mut mpsc::Receiver<MgmtEvent>,
    within: Duration,
    what: &str,
    pred: impl Fn(&MgmtEvent) -> bool,
) -> MgmtEvent {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = next(rx, left, what).await;
        if pred(&ev) {
            return ev;
        }
    }
}

fn cfg(addr: MgmtAddr, password: Option<&str>, reconcile: Duration) -> OpenvpnInstance {
    OpenvpnInstance {
        name: "udp".into(),
        protocol: tunmeter::types::SessionProtocol::OpenvpnUdp,
        addr,
        password: password.map(str::to_string),
        reconcile,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// TCP management on 127.0.0.1 inside the server namespace, with a password. The reconcile
/// interval is one minute, so a snapshot showing the new client within seconds can only come
/// from the `>CLIENT:ESTABLISHED` notification.
#[test]
fn tcp_password_notification_loss_and_recovery() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("ham", 1, true);
    std::fs::write(lab.path("mgmt.pw"), "s3cret pass\n").unwrap();
    let mgmt = format!("management 127.0.0.1 7505 {}", lab.path("mgmt.pw"));
    lab.start_server("srv", "hamtun0", &mgmt);
    let ns = lab.namespaces.names()[0].clone();
    let lab = std::sync::Arc::new(std::sync::Mutex::new(lab));
    let lab2 = lab.clone();
    let result = tunmeter_lab::in_netns(&ns, move || {
        let lab = lab2;
        rt().block_on(async move {
            let (tx, mut rx) = mpsc::channel(16);
            let c = cfg(MgmtAddr::Tcp("127.0.0.1:7505".into()), Some("s3cret pass"), Duration::from_secs(60));
            let task = tokio::spawn(run_instance(c, tx));

            // Logged in with the password: a snapshot, no clients yet.
            let ev = wait_for(&mut rx, Duration::from_secs(15), "first snapshot", |e| {
                matches!(e, MgmtEvent::Snapshot { .. })
            })
            .await;
            assert_eq!(ev, MgmtEvent::Snapshot { instance: "udp".into(), clients: vec![] });

            // A client connects: ESTABLISHED -> immediate status 3.
            let t = Instant::now();
            lab.lock().unwrap().start_client("cli", 1);
            let ev = wait_for(
                &mut rx,
                Duration::from_secs(30),
                "snapshot with the client",
                |e| matches!(e, MgmtEvent::Snapshot { clients, .. } if !clients.is_empty()),
            )
            .await;
            let MgmtEvent::Snapshot { clients, .. } = ev else { unreachable!() };
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
            assert_eq!(clients.len(), 1);
            let c = &clients[0];
            assert_eq!(c.common_name, "client1");
            assert_eq!(c.username.as_deref(), Some("alice"));
            assert_eq!(c.virtual_v4, Some("10.95.0.2".parse().unwrap()));
            let (ip, port) = c.real_address.split_once(':').expect("ip:port");
            assert_eq!(ip, "10.96.1.2");
            assert!(port.parse::<u16>().unwrap() > 0);

            // The management interface goes away (the server dies): Lost, once.
            lab.lock().unwrap().kill("srv");
            let ev = next(&mut rx, Duration::from_secs(10), "Lost after the server died").await;
            let MgmtEvent::Lost { instance, error } = ev else { panic!("expected Lost, got {ev:?}") };
            assert_eq!(instance, "udp");
            assert!(error.contains("closed") || error.contains("reading"), "{error}");

            // It comes back: a snapshot again (reconnect with backoff).
            lab.lock().unwrap().start_server("srv2", "hamtun0", &mgmt);
            let ev = next(&mut rx, Duration::from_secs(20), "snapshot after the server came back").await;
            assert!(matches!(ev, MgmtEvent::Snapshot { .. }), "no second Lost while reconnecting: {ev:?}");

            // Dropping the receiver stops the task.
            drop(rx);
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("task stops").unwrap();
            Ok(())
        })
    });
    let logs = {
        let l = lab.lock().unwrap();
        format!("server log:\n{}\nclient log:\n{}", l.log("srv"), l.log("cli"))
    };
    result.unwrap_or_else(|e| panic!("{e:#}\n{logs}"));
}

/// A unix-socket management interface with a password: the wrong password and no password are
/// clear Lost errors; the right one gives a snapshot every `reconcile`.
#[test]
fn unix_socket_wrong_password_and_reconcile() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("han", 2, false);
    std::fs::write(lab.path("mgmt.pw"), "right\n").unwrap();
    let sock = lab.dir.join("mgmt.sock");
    lab.start_server("srv", "hantun0", &format!("management {} unix {}", sock.display(), lab.path("mgmt.pw")));
    let log = lab.path("srv.log");
    rt().block_on(async {
        // Wait for the socket.
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(15), "no management socket; log:\n{}", read(&log));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let addr = MgmtAddr::Unix(sock.clone());

        for (password, want) in
            [(Some("wrong"), "rejected the password"), (None, "asks for a password but none is configured")]
        {
            let (tx, mut rx) = mpsc::channel(16);
            let task = tokio::spawn(run_instance(cfg(addr.clone(), password, Duration::from_secs(1)), tx));
            let ev = next(&mut rx, Duration::from_secs(10), "Lost for a bad login").await;
            let MgmtEvent::Lost { error, .. } = ev else { panic!("expected Lost, got {ev:?}") };
            eprintln!("bad login {password:?}: {error}");
            assert!(error.contains(want), "{password:?}: {error}");
            // It keeps retrying but reports the outage once.
            assert!(tokio::time::timeout(Duration::from_millis(2500), rx.recv()).await.is_err());
            drop(rx);
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("task stops").unwrap();
        }

        // Only the first line of the password is sent (OpenVPN's pw-file semantics): a second
        // line would be run as a management command.
        let (tx, mut rx) = mpsc::channel(16);
        let task =
            tokio::spawn(run_instance(cfg(addr, Some("right\nsignal SIGTERM\n"), Duration::from_millis(300)), tx));
        let first =
            wait_for(&mut rx, Duration::from_secs(10), "first snapshot", |e| matches!(e, MgmtEvent::Snapshot { .. }))
                .await;
        assert_eq!(first, MgmtEvent::Snapshot { instance: "udp".into(), clients: vec![] });
        let t = Instant::now();
        for _ in 0..4 {
            let ev = next(&mut rx, Duration::from_secs(3), "periodic snapshot").await;
            assert!(matches!(ev, MgmtEvent::Snapshot { .. }), "{ev:?}");
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_secs(4),
            "4 snapshots at 300 ms: {took:?}"
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("task stops").unwrap();
    });
    assert!(read(&log).contains("MANAGEMENT: CMD 'status 3'"), "the server saw status 3");
    assert!(!read(&log).contains("CMD 'signal"), "the password's second line was sent:\n{}", read(&log));
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

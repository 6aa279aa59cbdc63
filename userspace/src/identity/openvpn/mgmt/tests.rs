//! The management client against a fake management server on a socket: the line reader, the
//! password (first line only), reply timeouts against the hook's, and a Debug without secrets.

use std::path::PathBuf;

use super::*;

/// The line reader on a real socket pair: CRLF, the prompt without a line end, a line split
/// across writes.
#[tokio::test]
async fn line_reader() {
    let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
    let mut lines = Lines { io: Box::new(a), buf: Vec::new() };
    b.write_all(b"ENTER PASSWORD:").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap(), PROMPT);
    b.write_all(b"SUCCESS: password is correct\r\n>INFO:hi\r\nTIT").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap(), "SUCCESS: password is correct");
    assert_eq!(lines.next_line().await.unwrap(), ">INFO:hi");
    b.write_all(b"LE\tx\n").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap(), "TITLE\tx");
    drop(b);
    let e = lines.next_line().await.unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");
}

const STATUS_EMPTY: &str = "TITLE\tOpenVPN 2.6.14\r\nTIME\t2026-01-01 00:00:00\t1767225600\r\n\
    HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\t\
    Bytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\t\
    Peer ID\tData Channel Cipher\r\nGLOBAL_STATS\tMax bcast/mcast queue length\t0\r\nEND\r\n";

/// A fake management interface on a unix socket (one connection): asks for a password,
/// records what it received as the password and as the next command, and answers that
/// command with an empty status table after `delay`.
async fn fake_server(name: &str, delay: Duration) -> (MgmtAddr, tokio::task::JoinHandle<(String, String)>, PathBuf) {
    let path = std::env::temp_dir().join(format!("tunmeter-mgmt-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut lines = Lines { io: Box::new(sock), buf: Vec::new() };
        lines.io.write_all(PROMPT.as_bytes()).await.unwrap();
        let password = lines.next_line().await.unwrap();
        lines
            .io
            .write_all(b"SUCCESS: password is correct\r\n>INFO:OpenVPN Management Interface Version 5\r\n")
            .await
            .unwrap();
        let command = lines.next_line().await.unwrap();
        tokio::time::sleep(delay).await;
        lines.io.write_all(STATUS_EMPTY.as_bytes()).await.unwrap();
        // Keep the connection open until the client goes away.
        let _ = lines.next_line().await;
        (password, command)
    });
    (MgmtAddr::Unix(path.clone()), server, path)
}

fn test_cfg(addr: MgmtAddr, password: &str) -> OpenvpnInstance {
    OpenvpnInstance {
        name: "udp".into(),
        protocol: crate::types::SessionProtocol::OpenvpnUdp,
        addr,
        password: Some(password.into()),
        reconcile: Duration::from_secs(3600),
    }
}

#[test]
fn only_the_first_line_of_the_password_counts() {
    assert_eq!(first_line("s3cret"), "s3cret");
    assert_eq!(first_line("s3cret\nsignal SIGTERM\n"), "s3cret");
    assert_eq!(first_line("s3cret\r\nkill client1\r\n"), "s3cret");
    assert_eq!(first_line(""), "");
    assert_eq!(first_line("\nsecond"), "");
}

/// Extra lines of the password file are never sent: the line after the password is our
/// `status 3`, not the file's second line.
#[tokio::test]
async fn extra_password_lines_are_not_sent() {
    let (addr, server, path) = fake_server("pw", Duration::ZERO).await;
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(run_instance(test_cfg(addr, "s3cret pass\nsignal SIGTERM\nquit"), tx));
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(ev, MgmtEvent::Snapshot { instance: "udp".into(), clients: vec![] });
    drop(rx);
    task.await.unwrap();
    let (password, command) = server.await.unwrap();
    let _ = std::fs::remove_file(path);
    assert_eq!(password, "s3cret pass");
    assert_eq!(command, "status 3");
}

/// OpenVPN stalls its management interface while it runs our hook synchronously: the
/// status timeout must outlast the hook's worst case (two attempts and the pause).
#[test]
fn reply_timeout_outlasts_the_hook() {
    use super::super::hook::{ATTEMPT_TIMEOUT, RETRY_AFTER};
    let hook_worst = ATTEMPT_TIMEOUT * 2 + RETRY_AFTER;
    assert!(REPLY_TIMEOUT >= hook_worst + Duration::from_secs(3), "{REPLY_TIMEOUT:?} vs {hook_worst:?}");
    assert_eq!(LOGIN_TIMEOUT, Duration::from_secs(5));
}

/// A late status reply within the reply timeout (scaled down: 1.5 s of 3 s) is a reply,
/// not a lost connection.
#[tokio::test]
async fn a_slow_status_reply_is_not_lost() {
    let (addr, server, path) = fake_server("slow", Duration::from_millis(1500)).await;
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(run(test_cfg(addr, "pw"), tx, Duration::from_secs(3)));
    let t = std::time::Instant::now();
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(ev, MgmtEvent::Snapshot { instance: "udp".into(), clients: vec![] });
    assert!(t.elapsed() >= Duration::from_millis(1500), "{:?}", t.elapsed());
    drop(rx);
    task.await.unwrap();
    server.await.unwrap();
    let _ = std::fs::remove_file(path);
}

/// A status reply later than the reply timeout is Lost, naming the command and the limit.
#[tokio::test]
async fn a_status_reply_later_than_the_timeout_is_lost() {
    let (addr, server, path) = fake_server("late", Duration::from_secs(30)).await;
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(run(test_cfg(addr, "pw"), tx, Duration::from_secs(1)));
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    let MgmtEvent::Lost { error, .. } = ev else { panic!("expected Lost, got {ev:?}") };
    assert!(error.contains("status 3") && error.contains("1 s"), "{error}");
    drop(rx);
    task.await.unwrap();
    server.abort();
    let _ = std::fs::remove_file(path);
}

#[test]
fn debug_hides_the_password() {
    let c = test_cfg(MgmtAddr::Tcp("127.0.0.1:7505".into()), "s3cret\nmore");
    let d = format!("{c:?}");
    assert!(d.contains(r#"password: Some("***")"#), "{d}");
    assert!(!d.contains("s3cret") && !d.contains("more"), "{d}");
    assert!(d.contains("127.0.0.1:7505") && d.contains("reconcile"), "{d}");
    let d = format!("{:?}", OpenvpnInstance { password: None, ..c });
    assert!(d.contains("password: None"), "{d}");
}

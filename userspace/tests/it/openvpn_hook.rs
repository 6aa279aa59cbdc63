//! `tunmeter hook openvpn`, the real binary: exit codes and timing against a real HTTP server
//! on a real unix socket (`<state_dir>/control.sock`, or `--socket`), standing in for the daemon.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, Method, StatusCode, Uri},
    routing::any,
};
use tunmeter::identity::openvpn::hook::{HookCall, HookKind};

/// How the stand-in daemon answers successive requests (the last entry repeats).
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    Hang,
}

#[derive(Default)]
struct Seen {
    requests: Vec<(Method, String, Option<String>, Bytes)>,
}

struct FakeDaemon {
    dir: PathBuf,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    async fn start(name: &str, answers: Vec<Answer>) -> FakeDaemon {
        let dir = state_dir(name);
        let listener = tokio::net::UnixListener::bind(dir.join("control.sock")).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s2 = seen.clone();
        let app = Router::new().fallback(any(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = s2.clone();
            let answers = answers.clone();
            async move {
                let n = {
                    let mut s = seen.lock().unwrap();
                    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
                    s.requests.push((method, uri.path().to_string(), ct, body));
                    s.requests.len()
                };
                match answers[(n - 1).min(answers.len() - 1)] {
                    Answer::Status(code) => (
                        StatusCode::from_u16(code).unwrap(),
                        if code < 300 {
                            r#"{"session_id":"00000000-0000-4000-8000-000000000001","client_ip":"10.8.0.2"}"#
                                .to_string()
                        } else {
                            r#"{"error":{"code":"unavailable","message":"the ledger is not ready"}}"#.to_string()
                        },
                    ),
                    Answer::Hang => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        (StatusCode::OK, String::new())
                    }
                }
            }
        }));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeDaemon { dir, seen, task }
    }

    fn requests(&self) -> Vec<(Method, String, Option<String>, Bytes)> {
        self.seen.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ha-hook-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The environment OpenVPN 2.6 gives a client-connect script (values from a real capture).
fn connect_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("script_type", "client-connect"),
        ("dev", "tun0"),
        ("common_name", "client1"),
        ("username", "alice"),
        ("ifconfig_pool_remote_ip", "10.8.0.2"),
        ("ifconfig_pool_remote_ip6", "fd00:8::1000"),
        ("trusted_ip", "10.99.0.2"),
        ("trusted_port", "38937"),
        ("untrusted_ip", "10.99.0.2"),
        ("untrusted_port", "38937"),
        ("time_unix", "1795449874"),
        ("script_context", "init"),
    ]
}

/// Run the binary like OpenVPN does (temp file path as the last argument) on the blocking
/// pool; returns its output and how long it took.
async fn run_hook(dir: &std::path::Path, env: Vec<(&'static str, &'static str)>) -> (Output, Duration) {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_tunmeter"))
            .args(["hook", "openvpn", "--state-dir"])
            .arg(&dir)
            .arg("/tmp/openvpn_cc_0123456789abcdef.tmp")
            .env_clear()
            .envs(env)
            .output()
            .unwrap();
        (out, t.elapsed())
    })
    .await
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_line_failure(o: &Output) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    assert_eq!(stderr(o).trim_end().lines().count(), 1, "one line on stderr: {}", stderr(o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_on_200_with_the_call_as_json() {
    let d = FakeDaemon::start("ok", vec![Answer::Status(200)]).await;
    let (out, took) = run_hook(&d.dir, connect_env()).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(took < Duration::from_millis(900), "no retry needed: {took:?}");
    let reqs = d.requests();
    assert_eq!(reqs.len(), 1);
    let (method, path, ct, body) = &reqs[0];
    assert_eq!(*method, Method::POST);
    assert_eq!(path, "/api/v1/hooks/openvpn");
    assert_eq!(ct.as_deref(), Some("application/json"));
    let call: HookCall = serde_json::from_slice(body).unwrap();
    assert_eq!(
        call,
        HookCall {
            kind: HookKind::ClientConnect,
            dev: "tun0".into(),
            common_name: "client1".into(),
            username: Some("alice".into()),
            vpn_v4: Some("10.8.0.2".into()),
            vpn_v6: Some("fd00:8::1000".into()),
            real_address: "10.99.0.2:38937".into(),
            connected_since_unix: Some(1795449874),
            bytes_received: None,
            bytes_sent: None,
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_names_the_hook_socket_instead_of_the_state_dir() {
    let d = FakeDaemon::start("sock", vec![Answer::Status(200)]).await;
    let sock = d.dir.join("control.sock");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tunmeter"))
            .args(["hook", "openvpn", "--state-dir", "/nonexistent/tunmeter", "--socket"])
            .arg(&sock)
            .env_clear()
            .envs(connect_env())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(d.requests().len(), 1, "the call went to --socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_ipv6_peer() {
    let d = FakeDaemon::start("v6", vec![Answer::Status(204)]).await;
    let mut env = connect_env();
    env.retain(|(k, _)| !["script_type", "trusted_ip", "untrusted_ip", "username"].contains(k));
    env.extend([
        ("script_type", "client-disconnect"),
        ("trusted_ip6", "fd99::2"),
        ("bytes_received", "2161"),
        ("bytes_sent", "2206"),
    ]);
    let (out, _) = run_hook(&d.dir, env).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let call: HookCall = serde_json::from_slice(&d.requests()[0].3).unwrap();
    assert_eq!(call.kind, HookKind::ClientDisconnect);
    assert_eq!(call.real_address, "fd99::2");
    assert_eq!((call.bytes_received, call.bytes_sent), (Some(2161), Some(2206)));
    assert_eq!(call.username, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_503_succeeds() {
    let d = FakeDaemon::start("retry", vec![Answer::Status(503), Answer::Status(200)]).await;
    let (out, took) = run_hook(&d.dir, connect_env()).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(d.requests().len(), 2, "the retry was used");
    assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503_fail_closed_with_the_daemons_message() {
    let d = FakeDaemon::start("503", vec![Answer::Status(503)]).await;
    let (out, took) = run_hook(&d.dir, connect_env()).await;
    assert_one_line_failure(&out);
    assert_eq!(d.requests().len(), 2, "exactly one retry");
    let err = stderr(&out);
    assert!(err.contains("HTTP 503") && err.contains("the ledger is not ready"), "{err}");
    assert!(err.contains("client1") && err.contains("10.99.0.2:38937"), "{err}");
    assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_4xx_fail_closed() {
    let d = FakeDaemon::start("400", vec![Answer::Status(400)]).await;
    let (out, _) = run_hook(&d.dir, connect_env()).await;
    assert_one_line_failure(&out);
    assert!(stderr(&out).contains("HTTP 400"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_daemon_times_out_per_attempt() {
    let d = FakeDaemon::start("hang", vec![Answer::Hang]).await;
    let (out, took) = run_hook(&d.dir, connect_env()).await;
    assert_one_line_failure(&out);
    assert_eq!(d.requests().len(), 2);
    assert!(stderr(&out).contains("did not answer within 5 s"), "{}", stderr(&out));
    // 5 s + 1 s pause + 5 s.
    assert!(took >= Duration::from_millis(10_900) && took < Duration::from_secs(15), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_fails_after_the_retry() {
    let dir = state_dir("none");
    let (out, took) = run_hook(&dir, connect_env()).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_one_line_failure(&out);
    let err = stderr(&out);
    assert!(err.contains("cannot reach the daemon") && err.contains("control.sock"), "{err}");
    assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_bad_env_names_the_variable() {
    let d = FakeDaemon::start("env", vec![Answer::Status(200)]).await;
    for (drop, set, want) in [
        ("script_type", None, "script_type"),
        ("common_name", None, "common_name"),
        ("trusted_port", None, "trusted_port"),
        ("dev", None, "dev"),
        ("", Some(("ifconfig_pool_remote_ip", "10.8.0.999")), "ifconfig_pool_remote_ip"),
        ("", Some(("script_type", "learn-address")), "learn-address"),
    ] {
        let mut env = connect_env();
        env.retain(|(k, _)| *k != drop && Some(*k) != set.map(|s| s.0));
        env.extend(set);
        let (out, took) = run_hook(&d.dir, env).await;
        assert_one_line_failure(&out);
        assert!(stderr(&out).contains(want), "{want}: {}", stderr(&out));
        assert!(took < Duration::from_millis(900), "no retry for bad input: {took:?}");
    }
    assert!(d.requests().is_empty(), "nothing was sent");
}

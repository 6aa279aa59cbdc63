//! The ledger's self-check against the real daemon in the namespace lab: under traffic every
//! attached device agrees with the programs; a program detached by hand (BPF_LINK_DETACH on its
//! pinned link, behind the daemon's back) is reported as drift within a few polls, in
//! `/api/v1/stats`, in the metrics and as a `ledger.drift` webhook event.

use crate::support;

use std::{
    ffi::CString,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{control::call, require_root};
use tunmeter_lab::traffic;

type Env = support::env::LabEnv;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detach a pinned TCX link the way an operator's tool would: open the pin, BPF_LINK_DETACH.
fn detach_by_hand(pin: &Path) {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 2];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zero-padded attr of the size passed; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), size_of_val(&attr)) };
    assert!(fd >= 0, "BPF_OBJ_GET {}: {}", pin.display(), std::io::Error::last_os_error());
    // union bpf_attr for BPF_LINK_DETACH: link_fd (u32).
    let mut attr = [0u64; 2];
    attr[0] = fd as u64;
    // SAFETY: as above; fd is ours and closed right after.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), size_of_val(&attr)) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd came from BPF_OBJ_GET above and is not used after this.
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0, "BPF_LINK_DETACH {}: {err}", pin.display());
}

fn iface<'a>(stats: &'a Value, name: &str) -> Option<&'a Value> {
    stats["self_check"]["interfaces"].as_array()?.iter().find(|i| i["interface"] == name)
}

fn wait_for(env: &Env, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (s, v) = call(&env.state, "GET", "/api/v1/stats", None);
        assert_eq!(s, 200, "{v}");
        if ok(&v) {
            return v;
        }
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}; last stats: {:#}", v["self_check"]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_program_detached_by_hand_is_reported_as_drift() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsc", 1, 1);
    std::fs::create_dir_all(&env.state).unwrap();
    let config = env.state.join("selfcheck.toml");
    // Deliveries go to a closed port: the events stay in the outbox, where the API lists them.
    std::fs::write(
        &config,
        "[ledger]\ndrift_threshold_packets = 5\ndrift_polls = 2\n\n[[webhook]]\nname = \"sink\"\n\
         url = \"http://127.0.0.1:9/hook\"\nsecret = \"selfcheck-test-secret\"\nmin_backoff_ms = 100\nmax_backoff_secs = 1\nallow_private = true\n",
    )
    .unwrap();
    let config_s = config.display().to_string();
    let mut d = env.start_daemon(&["--config", &config_s, "--poll-interval-ms", "200", "--flush-interval-ms", "500"]);
    let bg = traffic::background(&env.lab, Duration::from_millis(20)).expect("background traffic");

    // Under traffic, both devices (tun0 at L3, eth0 at L2) agree with the programs.
    let healthy = wait_for(&env, "both devices checked under traffic", Duration::from_secs(30), |v| {
        ["tun0", "eth0"].iter().all(|n| {
            iface(v, n).is_some_and(|i| {
                i["upload"]["polls"].as_u64() >= Some(10) && i["upload"]["device_packets"].as_u64() > Some(50)
            })
        })
    });
    eprintln!("self-check under traffic: {:#}", healthy["self_check"]);
    for name in ["tun0", "eth0"] {
        let i = iface(&healthy, name).unwrap();
        assert_eq!(i["status"], "ok", "{name}: {i:#}");
        for dir in ["upload", "download"] {
            let d = &i[dir];
            let (dev, counted, missed) = (
                d["device_packets"].as_u64().unwrap(),
                d["counted_packets"].as_u64().unwrap(),
                d["missed_packets"].as_u64().unwrap(),
            );
            assert!(dev > 0 && counted > 0, "{name} {dir}: nothing counted: {d:#}");
            // Readings of the device and the map are a few microseconds apart: a packet in
            // between shows as missed in one poll, never as a steady loss.
            assert!(missed * 50 <= dev, "{name} {dir}: {missed} of {dev} packets missed with the programs attached");
            assert_eq!(d["alerting"], false, "{name} {dir}: {d:#}");
        }
        // Upload bytes agree too (L2 devices count their Ethernet header, added back per packet).
        // Download on tun0 does not have to: it segments after TC and counts each segment's
        // headers, which the report shows as unexplained bytes.
        let up = &i["upload"];
        let unexplained = up["unexplained_bytes"].as_i64().unwrap().unsigned_abs();
        assert!(unexplained * 50 <= up["device_bytes"].as_u64().unwrap(), "{name} upload bytes: {up:#}");
    }

    // Behind the daemon's back: tun0's ingress program is detached.
    detach_by_hand(&env.pins.path().join("links").join("ingress:tun0"));
    let t0 = Instant::now();
    let drift = wait_for(&env, "tun0 upload reported as drift", Duration::from_secs(15), |v| {
        iface(v, "tun0").is_some_and(|i| i["upload"]["alerting"] == true)
    });
    eprintln!("drift reported {:?} after the detach", t0.elapsed());
    let tun0 = iface(&drift, "tun0").unwrap();
    assert_eq!(tun0["status"], "drift", "{tun0:#}");
    assert!(tun0["upload"]["missed_packets"].as_u64().unwrap() > 10, "{tun0:#}");
    assert_eq!(tun0["download"]["alerting"], false, "egress is still attached: {tun0:#}");
    assert_eq!(iface(&drift, "eth0").unwrap()["status"], "ok", "eth0 was not touched");

    // The same in the metrics, and one ledger.drift event for the episode.
    let (s, m) = call(&env.state, "GET", "/metrics", None);
    assert_eq!(s, 200);
    let text = m.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(r#"tunmeter_selfcheck_drifting{interface="tun0",direction="upload"} 1"#),
        "metrics lack the drift:\n{text}"
    );
    assert!(text.contains(r#"tunmeter_selfcheck_drifting{interface="eth0",direction="upload"} 0"#));
    let (s, ev) = call(&env.state, "GET", "/api/v1/webhooks/events?subject=interface:tun0", None);
    assert_eq!(s, 200, "{ev}");
    let events: Vec<&Value> = ev["events"].as_array().unwrap().iter().filter(|e| e["type"] == "ledger.drift").collect();
    assert_eq!(events.len(), 1, "one event per episode: {ev:#}");
    let data = &events[0]["data"];
    assert_eq!((data["state"].as_str(), data["direction"].as_str()), (Some("drifting"), Some("upload")), "{data}");
    assert!(data["missed_packets"].as_u64().unwrap() > 5, "{data}");

    bg.stop();
    d.stop();
}

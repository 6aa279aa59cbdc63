//! Rules are not accepted too easily: `tunmeter steer add` (no daemon, no config) refuses a
//! redirect of every address, a loopback device, a device outside the client subnets it reads
//! from the pinned subnet map, and a public port this host listens on (naming the listener);
//! `--force` overrides each.

use super::*;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn refused(env: &Env, args: &[&str], needles: &[&str]) {
    let out = steer(env, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`steer {}` was accepted:\n{err}", args.join(" "));
    for n in needles {
        assert!(err.contains(n), "`steer {}`: the error does not say {n:?}:\n{err}", args.join(" "));
    }
    assert!(steer_list(env)["forward"].as_array().unwrap().is_empty(), "a refused rule was stored");
}

#[test]
fn steer_add_refuses_open_sources_foreign_devices_and_ports_in_use() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsk", 1, 1);
    let srv = env.lab.server_ns();
    let daemon = env.start_daemon(&[]);
    let fwd = |port: &str, device: &str| -> Vec<String> {
        ["add", "forward", "--proto", "tcp", "--public-port", port, "--device", device].map(String::from).to_vec()
    };

    for src in ["0.0.0.0/0", "::/0"] {
        refused(
            &env,
            &["add", "redirect", "--source", src, "--proxy-port", "12345"],
            &[src, "every address", "--force"],
        );
    }
    refused(&env, &strs(&fwd("18080", "127.0.0.1:80")), &["127.0.0.1", "loopback"]);
    // The subnets come from the daemon's pinned subnet map.
    refused(&env, &strs(&fwd("18080", "10.7.0.2:80")), &["10.7.0.2", "outside every client subnet", "10.8.0.0/24"]);

    // Sockets of this host on public ports: a TCP listener and a bound UDP socket in the server
    // namespace (created there, they stay there).
    let tcp = tunmeter_lab::in_netns(&srv, || Ok(std::net::TcpListener::bind("0.0.0.0:0")?)).unwrap();
    let udp = tunmeter_lab::in_netns(&srv, || Ok(std::net::UdpSocket::bind("[::]:0")?)).unwrap();
    let (tport, uport) = (tcp.local_addr().unwrap().port().to_string(), udp.local_addr().unwrap().port().to_string());
    let pid = format!("pid {}", std::process::id());
    refused(
        &env,
        &strs(&fwd(&tport, "10.8.0.2:80")),
        &[&format!("tcp port {tport} is in use"), "listening on 0.0.0.0", &pid],
    );
    let udp_args = ["add", "forward", "--proto", "udp", "--public-port", &uport, "--device", "10.8.0.2:53"];
    refused(&env, &udp_args, &[&format!("udp port {uport} is in use"), "bound to [::]", &pid]);
    // A port only this host's loopback listens on is fine, as is the same port restricted to
    // another public address than the listener's.
    let lo = tunmeter_lab::in_netns(&srv, || Ok(std::net::TcpListener::bind("127.0.0.1:0")?)).unwrap();
    let lo_port = lo.local_addr().unwrap().port().to_string();
    steer_ok(&env, &strs(&fwd(&lo_port, "10.8.0.2:80")));
    steer_ok(&env, &["del", "forward", "--proto", "tcp", "--public-port", &lo_port]);

    // --force overrides every check.
    for mut args in [fwd(&tport, "10.8.0.2:80"), fwd("18081", "127.0.0.1:80"), fwd("18082", "10.7.0.2:80")] {
        args.push("--force".into());
        steer_ok(&env, &strs(&args));
    }
    steer_ok(&env, &[&udp_args[..], &["--force"]].concat());
    steer_ok(&env, &["add", "redirect", "--source", "0.0.0.0/0", "--proxy-port", "12345", "--force"]);
    let list = steer_list(&env);
    assert_eq!(list["forward"].as_array().unwrap().len(), 4, "{list}");
    assert!(redirect_rule(&list, "0.0.0.0/0").is_some(), "{list}");

    // The egress program's device set follows the rules (what `device_without_flow` drops).
    let t = support::steer::SteerTables::new(env.pins.path());
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
    let want =
        vec![(ip("10.7.0.2"), 80, 6), (ip("10.8.0.2"), 53, 17), (ip("10.8.0.2"), 80, 6), (ip("127.0.0.1"), 80, 6)];
    assert_eq!(t.devices(), want);
    assert_eq!(t.device_ports(), [53, 80]);
    // The ingress skip hints: only the ruled public ports are looked up; redirects are.
    let mut ruled: Vec<u16> = vec![tport.parse().unwrap(), uport.parse().unwrap(), 18081, 18082];
    ruled.sort();
    ruled.dedup();
    assert_eq!(t.looked_up_ports(), Some(ruled));
    assert_eq!(t.redirect_empty(), 0);
    for port in [tport.as_str(), "18081", "18082"] {
        steer_ok(&env, &["del", "forward", "--proto", "tcp", "--public-port", port]);
    }
    assert_eq!(t.devices(), [(ip("10.8.0.2"), 53, 17)]);
    assert_eq!(t.device_ports(), [53]);
    assert_eq!(t.looked_up_ports(), Some(vec![uport.parse().unwrap()]));
    steer_ok(&env, &["del", "redirect", "--source", "0.0.0.0/0"]);
    assert_eq!(t.redirect_empty(), tunmeter_common::REDIRECT_NONE, "no redirect rule left: skipped");
    drop((tcp, udp, lo));
    let _ = &daemon;
}

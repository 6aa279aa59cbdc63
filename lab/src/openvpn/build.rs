//! Building an OpenVPN lab: namespaces and links, the PKI, server and client configuration
//! files, the echo and transfer servers, then both server instances.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    CUST_V4, CUST_V6, OVPN_PORT, OvpnLab, OvpnLabConfig, SERVER_ETH_V4, SERVER_ETH_V6, Transport, cleanup, lab_dir, s,
};
use crate::certs::Pki;
use crate::sinks::Sinks;
use crate::transfer::TransferServer;
use crate::{in_netns, ipn};

impl OvpnLab {
    /// Build the namespaces, generate the PKI, start both server instances (waiting until they
    /// are initialised) and the echo/transfer servers. Clients are not started: see
    /// [`OvpnLab::connect`] / [`OvpnLab::connect_all`]. Leftovers with the same prefix are removed
    /// first; on failure everything created so far is removed again.
    pub fn up(cfg: OvpnLabConfig) -> Result<OvpnLab> {
        cfg.validate()?;
        cleanup(&cfg.prefix).context("removing leftovers")?;
        let dir = lab_dir(&cfg.prefix);
        let n = cfg.clients.len();
        let mut lab = OvpnLab {
            cfg,
            dir,
            namespaces: crate::Namespaces::new(),
            servers: [None, None],
            clients: (0..n).map(|_| None).collect(),
            services: Vec::new(),
            cleaned: false,
        };
        let prefix = lab.cfg.prefix.clone();
        lab.build().with_context(|| format!("building OpenVPN lab {prefix}"))?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        self.namespaces.add(ns, false)
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("tmp"))
            .with_context(|| format!("create {}", self.dir.join("tmp").display()))?;
        let srv = self.server_ns();
        let cust = self.cust_ns();
        self.add_ns(&srv)?;
        self.add_ns(&cust)?;
        in_netns(&srv, || {
            for p in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
                std::fs::write(p, "1").with_context(|| format!("write {p}"))?;
            }
            Ok(())
        })?;

        // Customer link.
        ipn(&srv, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &cust])?;
        for (ns, v4, v6) in [(&srv, SERVER_ETH_V4, SERVER_ETH_V6), (&cust, CUST_V4, CUST_V6)] {
            ipn(ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ipn(ns, &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ipn(ns, &["link", "set", "eth0", "up"])?;
        }
        ipn(&cust, &["route", "add", "default", "via", &SERVER_ETH_V4.to_string()])?;
        ipn(&cust, &["-6", "route", "add", "default", "via", &SERVER_ETH_V6.to_string()])?;

        // Client links.
        for i in 0..self.cfg.clients.len() {
            let ns = self.client_ns(i);
            self.add_ns(&ns)?;
            let port = format!("c{}", i + 1);
            ipn(&srv, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ipn(&srv, &["addr", "add", &format!("{}/30", self.server_real_ip(i)), "dev", &port])?;
            ipn(&srv, &["link", "set", &port, "up"])?;
            ipn(&ns, &["addr", "add", &format!("{}/30", self.client_real_ip(i)), "dev", "eth0"])?;
            ipn(&ns, &["link", "set", "eth0", "up"])?;
        }

        // PKI and configuration files.
        let names: Vec<&str> = self.cfg.clients.iter().map(|c| c.name.as_str()).collect();
        let pki = Pki::generate(&self.dir.join("pki"), "server", &names)?;
        if let Some(pw) = &self.cfg.mgmt_password {
            write_private(&self.dir.join("mgmt.pw"), &format!("{pw}\n"))?;
        }
        for t in Transport::ALL {
            let ccd = self.dir.join(format!("ccd-{t}"));
            std::fs::create_dir_all(&ccd)?;
            for (i, c) in self.cfg.clients.iter().enumerate().filter(|(_, c)| c.transport == t) {
                let a = self.expected_addrs(i);
                let v6 = a.v6.expect("lab clients have IPv6");
                std::fs::write(
                    ccd.join(&c.name),
                    format!("ifconfig-push {} 255.255.255.0\nifconfig-ipv6-push {v6}/64 {}\n", a.v4, t.server_v6()),
                )?;
            }
            std::fs::write(self.server_conf(t), self.server_config(t, &pki))?;
        }
        for (i, c) in self.cfg.clients.iter().enumerate() {
            write_private(&self.client_auth(i), &format!("{}\n{}\n", c.username, c.password))?;
            std::fs::write(self.client_conf(i), self.client_config(i, &pki))?;
        }

        let mut service_ns = vec![srv.clone(), cust];
        service_ns.extend((0..self.cfg.clients.len()).map(|i| self.client_ns(i)));
        for ns in service_ns {
            self.services.push((Sinks::start(&ns)?, TransferServer::start(&ns)?));
        }
        for t in Transport::ALL {
            self.start_instance(t)?;
        }
        Ok(())
    }

    fn server_config(&self, t: Transport, pki: &Pki) -> String {
        let d = |name: &str| s(&self.dir.join(name));
        let mut c = String::new();
        let mut line = |l: String| {
            c += &l;
            c.push('\n');
        };
        line(format!("# tunmeter-lab OpenVPN {t} server instance"));
        line(format!("dev {}", t.server_dev()));
        line("dev-type tun".into());
        line("disable-dco".into());
        line(format!("proto {}", if t == Transport::Udp { "udp4" } else { "tcp4-server" }));
        line(format!("port {OVPN_PORT}"));
        line("topology subnet".into());
        line(format!("server {} 255.255.255.0", Ipv4Addr::new(10, 8, t.third_octet(), 0)));
        line(format!("server-ipv6 {}/64", Ipv6Addr::new(0xfd00, 8, t.v6_group(), 0, 0, 0, 0, 0)));
        line(format!("client-config-dir {}", d(&format!("ccd-{t}"))));
        line(format!("push \"route {} 255.255.255.0\"", Ipv4Addr::new(10, 9, 0, 0)));
        line("push \"route-ipv6 fd00:9::/64\"".into());
        line(format!("ca {}", s(&pki.ca_cert)));
        line(format!("cert {}", s(&pki.server.cert)));
        line(format!("key {}", s(&pki.server.key)));
        line("dh none".into());
        line("keepalive 2 10".into());
        if t == Transport::Udp {
            line("explicit-exit-notify 1".into());
        }
        match &self.cfg.mgmt_password {
            Some(_) => line(format!("management 127.0.0.1 {} {}", t.mgmt_port(), d("mgmt.pw"))),
            None => line(format!("management 127.0.0.1 {}", t.mgmt_port())),
        }
        line("script-security 2".into());
        line("auth-user-pass-verify /bin/true via-file".into());
        if let Some(h) = &self.cfg.hook {
            line(format!("client-connect \"{h}\""));
            line(format!("client-disconnect \"{h}\""));
        }
        line(format!("tmp-dir {}", d("tmp")));
        line(format!("status {} 1", s(&self.status_file(t))));
        line("status-version 3".into());
        line("verb 3".into());
        c
    }

    fn client_config(&self, i: usize, pki: &Pki) -> String {
        let spec = &self.cfg.clients[i];
        let mut c = String::new();
        let mut line = |l: String| {
            c += &l;
            c.push('\n');
        };
        line(format!("# tunmeter-lab OpenVPN client {} ({})", spec.name, spec.transport));
        line("client".into());
        line("dev tun0".into());
        line("dev-type tun".into());
        line("disable-dco".into());
        match spec.transport {
            Transport::Udp => {
                line("proto udp4".into());
                line("nobind".into());
                line("explicit-exit-notify 1".into());
            }
            Transport::Tcp => line("proto tcp4-client".into()),
        }
        line(format!("remote {} {OVPN_PORT}", self.server_real_ip(i)));
        line("connect-retry 1 2".into());
        line(format!("ca {}", s(&pki.ca_cert)));
        line(format!("cert {}", s(&pki.clients[i].cert)));
        line(format!("key {}", s(&pki.clients[i].key)));
        line("remote-cert-tls server".into());
        line(format!("auth-user-pass {}", s(&self.client_auth(i))));
        line("auth-nocache".into());
        line(format!("tmp-dir {}", s(&self.dir.join("tmp"))));
        line("verb 3".into());
        c
    }
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

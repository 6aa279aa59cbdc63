//! Where webhooks may go: unless an endpoint sets `allow_private = true`, its host is resolved
//! at delivery time (reqwest's resolver hook, so the checked address is the one connected to) and
//! loopback, private (RFC 1918, CGNAT), link-local (169.254.169.254 metadata), unique-local and
//! unspecified addresses are refused; an IP literal in the URL is checked before sending.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why `ip` is refused for an endpoint without `allow_private`, or None if it may be used.
pub fn denied(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback() {
                Some("loopback")
            } else if a == std::net::Ipv4Addr::new(169, 254, 169, 254) {
                Some("cloud metadata")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                Some("private")
            } else if a.is_unspecified() || a.is_broadcast() {
                Some("unspecified")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let seg = a.segments();
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if (seg[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (seg[0] & 0xfe00) == 0xfc00 {
                Some("unique-local")
            } else {
                None
            }
        }
    }
}

/// The error for a refused address (what the delivery log and the outbox show).
pub fn refusal(host: &str, ip: IpAddr, why: &str) -> String {
    format!("refused: {host} is {ip}, a {why} address (set allow_private = true on this [[webhook]] to allow it)")
}

/// The IP literal in `url`'s host, if it is one and refused: the error to record.
pub fn check_literal(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    let ip: IpAddr = u.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    denied(ip).map(|why| refusal(&ip.to_string(), ip, why))
}

/// The system resolver with refused addresses taken out; a name left with none fails.
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| denied(a.ip()).is_none()).collect();
            if allowed.is_empty() {
                let Some(first) = all.first() else { return Err(format!("{host}: no address").into()) };
                let why = denied(first.ip()).unwrap_or("refused");
                return Err(refusal(&host, first.ip(), why).into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The resolver for an endpoint: None (the default one) where private addresses are allowed.
pub fn resolver(allow_private: bool) -> Option<Arc<PublicOnly>> {
    (!allow_private).then(|| Arc::new(PublicOnly))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_metadata_addresses_are_refused() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.2", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.100.100.200", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("fd00:ec2::254", "unique-local"),
            ("0.0.0.0", "unspecified"),
        ] {
            assert_eq!(denied(ip.parse().unwrap()), Some(why), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1", "1.1.1.1"] {
            assert_eq!(denied(ip.parse().unwrap()), None, "{ip}");
        }
        assert!(check_literal("http://127.0.0.1:9/x").unwrap().contains("allow_private = true"));
        assert!(check_literal("http://[fd00::1]/x").unwrap().contains("unique-local"));
        assert_eq!(check_literal("https://hooks.example.com/x"), None);
    }

    /// A real request to a listener on 127.0.0.1 by name (`localhost`, through the resolver):
    /// refused without a connection unless allowed.
    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_delivery_unless_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        });
        let url = format!("http://localhost:{port}/hook");
        let mut denied_client = reqwest::Client::builder();
        if let Some(r) = resolver(false) {
            denied_client = denied_client.dns_resolver(r);
        }
        let e = denied_client.build().unwrap().post(&url).send().await.unwrap_err();
        let text = format!("{:?}", e);
        assert!(text.contains("refused: localhost") && text.contains("loopback"), "{text}");
        assert!(!server.is_finished());
        assert!(resolver(true).is_none());
        let ok = reqwest::Client::new().post(&url).send().await.unwrap();
        assert_eq!(ok.status(), 204);
        server.await.unwrap();
    }
}

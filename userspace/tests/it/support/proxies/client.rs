//! Clients run from inside a namespace: one TCP request read to EOF, one UDP request and its
//! reply.

use super::*;

// ---- sockets with raw options (libc) ----

// ---- clients, run from inside a namespace ----

/// From `ns`: connect to `dst` (timeout `timeout`), send `payload`, shut down the write side,
/// read everything until EOF. Returns what was read.
pub fn tcp_request(ns: &str, dst: SocketAddr, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
    let ns_s = ns.to_string();
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&dst, timeout).with_context(|| format!("connect {dst} from {ns_s}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> Result<()> {
            w.write_all(&payload).context("write")?;
            w.shutdown(Shutdown::Write).context("shutdown")?;
            Ok(())
        });
        let mut r = s;
        let mut got = Vec::new();
        let res = r.read_to_end(&mut got).with_context(|| format!("read from {dst} after {} bytes", got.len()));
        let w = writer.join().map_err(|_| anyhow!("writer panicked"))?;
        res?;
        w?;
        Ok(got)
    })
}

/// From `ns`: a UDP socket connected to `dst` sends `payload` and waits for one reply (which
/// must come from `dst`, being connected). Returns the reply.
pub fn udp_request(ns: &str, dst: SocketAddr, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
    in_netns(ns, move || {
        let any: SocketAddr =
            if dst.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let u = UdpSocket::bind(any)?;
        u.connect(dst)?;
        u.set_read_timeout(Some(timeout))?;
        u.send(&payload).with_context(|| format!("send {} bytes to {dst}", payload.len()))?;
        let mut buf = vec![0u8; 65536];
        let n = u.recv(&mut buf).with_context(|| format!("no reply from {dst} within {timeout:?}"))?;
        buf.truncate(n);
        Ok(buf)
    })
}

//! tunmeter-lab's one integration-test binary (`cargo test -p tunmeter-lab --test it`): the
//! namespace lab (`lab`), the OpenVPN lab (`openvpn`) and the WireGuard lab (`wireguard`). They
//! need root and are skipped otherwise; every test uses its own lab prefix, so they run in
//! parallel.

mod lab;
mod openvpn;
mod wireguard;

/// True as root; otherwise says the test is skipped.
fn root() -> bool {
    let ok = tunmeter_lab::is_root();
    if !ok {
        eprintln!("SKIP: needs root");
    }
    ok
}

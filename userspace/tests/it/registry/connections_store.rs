//! Connections on a store: http, socks5 and openvpn kinds, their forward rules and redirect
//! sources, validation and conflicts.

use super::*;

pub(super) async fn connections_crud(db: &Database) {
    let n = "rg-conns";
    let _hooks = node(db, n, &[]).await;
    let d4 = devices::create(db, n, "phone", ip("10.8.0.2"), T0).await.unwrap();
    let d6 = devices::create(db, n, "v6 only", ip("fd00:8::2"), T0).await.unwrap();
    let http = connections::create(db, n, None, &forward(&d4.id, "http", 18080, 3128), T0).await.unwrap();
    assert_eq!((http.public_port, http.device_port, http.username.as_deref()), (Some(18080), Some(3128), None));
    assert_eq!(
        http.forward_spec(d4.vpn_ip).map(|s| (s.public_port, s.device.to_string())),
        Some((18080, "10.8.0.2:3128".to_string()))
    );
    let socks = connections::create(db, n, None, &forward(&d4.id, "socks5", 11080, 1080), T0 + 1).await.unwrap();
    let ovpn = connections::create(db, n, None, &openvpn(&d6.id, "bob@example.org", 12345), T0 + 2).await.unwrap();
    assert_eq!((ovpn.proxy_port, ovpn.public_port), (Some(12345), None));
    assert_eq!(connections::list(db, n).await.unwrap(), vec![http.clone(), socks.clone(), ovpn.clone()]);
    assert_eq!(connections::get(db, n, &ovpn.id).await.unwrap(), ovpn);

    // Each refusal names its problem.
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut cases: Vec<(NewConnection, &str)> = vec![
        (forward(&d4.id, "http", 18080, 8080), "public port 18080 is used by connection"),
        (openvpn(&d4.id, "bob@example.org", 1), "username \"bob@example.org\" has connection"),
        (forward(&d6.id, "http", 18081, 3128), "forward rules are IPv4"),
        (forward(&unknown, "http", 18082, 3128), "not found"),
        (forward("not-a-uuid", "http", 18082, 3128), "is not a UUID"),
        (forward(&d4.id, "http", 0, 3128), "public_port 0 is not a port"),
        (forward(&d4.id, "http", 18082, 0), "device_port 0 is not a port"),
        (openvpn(&d4.id, "", 1), "username must be 1 to 64"),
        (openvpn(&d4.id, &"u".repeat(65), 1), "got 65"),
        (openvpn(&d4.id, "bad/name", 1), "has the character '/'"),
        (openvpn(&d4.id, "carol", 0), "proxy_port 0 is not a port"),
    ];
    // A protocol that does not exist cannot be named: it is refused where the body is parsed.
    let e = serde_json::from_value::<NewConnection>(serde_json::json!({
        "device_id": d4.id, "protocol": "https", "public_port": 18082, "device_port": 3128
    }))
    .unwrap_err();
    assert!(e.to_string().contains("bad protocol \"https\""), "{e}");
    let mut no_port = forward(&d4.id, "http", 1, 1);
    no_port.public_port = None;
    cases.push((no_port, "needs public_port"));
    let mut extra = openvpn(&d4.id, "dave", 5);
    extra.device_port = Some(80);
    cases.push((extra, "has no device_port"));
    let mut user_on_http = forward(&d4.id, "socks5", 2, 2);
    user_on_http.username = Some("erin".into());
    cases.push((user_on_http, "has no username"));
    for (c, want) in cases {
        let e = connections::create(db, n, None, &c, T0).await.unwrap_err();
        assert!(e.to_string().contains(want), "{c:?}: {e} (wanted {want:?})");
        let kind_ok = match &e {
            RegistryError::Conflict(_) => want.contains("used by") || want.contains("has connection"),
            RegistryError::NotFound { what: "device", .. } => want == "not found",
            RegistryError::BadId(_) => want.contains("UUID"),
            RegistryError::Invalid(_) => true,
            _ => false,
        };
        assert!(kind_ok, "{e:?}");
    }
    assert_eq!(connections::list(db, n).await.unwrap().len(), 3, "no refused connection was stored");

    // Delete; then the port is free again.
    connections::delete(db, n, None, &http.id).await.unwrap();
    assert!(matches!(connections::get(db, n, &http.id).await, Err(RegistryError::NotFound { .. })));
    assert!(matches!(connections::delete(db, n, None, &http.id).await, Err(RegistryError::NotFound { .. })));
    assert!(matches!(connections::delete(db, n, None, "zz").await, Err(RegistryError::BadId(_))));
    connections::create(db, n, None, &forward(&d4.id, "http", 18080, 3129), T0 + 3).await.unwrap();
    // Ports and usernames are per node.
    let _h = node(db, "rg-conns-b", &[]).await;
    let other = devices::create(db, "rg-conns-b", "phone", ip("10.8.0.2"), T0).await.unwrap();
    connections::create(db, "rg-conns-b", None, &forward(&other.id, "http", 18080, 3128), T0).await.unwrap();
    connections::create(db, "rg-conns-b", None, &openvpn(&other.id, "bob@example.org", 1), T0).await.unwrap();
    // A device of another node is unknown here.
    let e = connections::create(db, n, None, &forward(&other.id, "http", 18090, 1), T0).await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { what: "device", .. }), "{e:?}");
}

-- Who is behind each VPN address: sessions, devices and the connections sold on them.
-- Portable SQL (SQLite and PostgreSQL). Ids are UUIDs as text; times are ms since the epoch.

-- One row per VPN connection of a client (OpenVPN, WireGuard, or opened through the API).
-- Bytes come from the ledger: start_* are the client's ledger totals when the session opened,
-- up_bytes/down_bytes what it carried (written when it closes).
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    -- openvpn-udp, openvpn-tcp, wireguard, other
    protocol TEXT NOT NULL,
    -- management instance name or WireGuard interface ('' for API sessions)
    instance TEXT NOT NULL DEFAULT '',
    common_name TEXT NOT NULL DEFAULT '',
    username TEXT NOT NULL DEFAULT '',
    -- where the client connects from (ip:port), '' if unknown
    real_address TEXT NOT NULL DEFAULT '',
    -- who opened it: hook, management, wireguard, api
    source TEXT NOT NULL,
    opened_unix_ms BIGINT NOT NULL,
    closed_unix_ms BIGINT,
    close_reason TEXT,
    start_up_bytes BIGINT NOT NULL,
    start_down_bytes BIGINT NOT NULL,
    up_bytes BIGINT NOT NULL DEFAULT 0,
    down_bytes BIGINT NOT NULL DEFAULT 0,
    FOREIGN KEY (node_id, client_ip) REFERENCES clients (node_id, ip) ON DELETE CASCADE
);
-- At most one active session per client: the database enforces it.
CREATE UNIQUE INDEX sessions_one_active ON sessions (node_id, client_ip) WHERE closed_unix_ms IS NULL;
CREATE INDEX sessions_by_client ON sessions (node_id, client_ip, opened_unix_ms);
CREATE INDEX sessions_by_time ON sessions (node_id, opened_unix_ms);

-- The backends behind the VPN (phones, routers), each at one VPN address.
-- status is the last state announced (device.offline / device.recovered), so a restart neither
-- repeats nor forgets a transition.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    vpn_ip TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unknown' CHECK (status IN ('unknown', 'online', 'offline')),
    status_changed_unix_ms BIGINT,
    UNIQUE (node_id, name),
    UNIQUE (node_id, vpn_ip)
);

-- Access sold on a device. http/socks5: customers reach the device's proxy (vpn_ip:device_port)
-- at public_port (a forward rule). openvpn: the traffic of the OpenVPN user `username` goes to
-- the local transparent proxy at proxy_port, which carries it to the device (a redirect rule
-- for the user's VPN address while connected).
CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices (id),
    protocol TEXT NOT NULL CHECK (protocol IN ('http', 'socks5', 'openvpn')),
    public_port INTEGER,
    device_port INTEGER,
    username TEXT,
    proxy_port INTEGER,
    created_unix_ms BIGINT NOT NULL,
    CHECK (
        (protocol IN ('http', 'socks5') AND public_port IS NOT NULL AND device_port IS NOT NULL
            AND username IS NULL AND proxy_port IS NULL)
        OR (protocol = 'openvpn' AND username IS NOT NULL AND proxy_port IS NOT NULL
            AND public_port IS NULL AND device_port IS NULL)
    ),
    UNIQUE (node_id, public_port),
    UNIQUE (node_id, username)
);
CREATE INDEX connections_by_device ON connections (device_id);

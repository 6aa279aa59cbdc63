-- tunmeter ledger schema. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Every row that belongs to a server carries node_id, so several servers can share one
-- PostgreSQL. Counters are BIGINT (bytes, packets); times are milliseconds since the Unix epoch.

CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    -- Which kernel counter map the client cursors below refer to ("<boot id>/<map id>").
    kernel_epoch TEXT NOT NULL DEFAULT '',
    -- Hour rows before this time are rolled up from minute rows, day rows from hour rows.
    hours_rolled_until_ms BIGINT NOT NULL DEFAULT 0,
    days_rolled_until_ms BIGINT NOT NULL DEFAULT 0,
    created_unix_ms BIGINT NOT NULL,
    updated_unix_ms BIGINT NOT NULL
);

-- One row per VPN client address per node. Three sets of counters:
--   cursor_*: kernel counter values already in the ledger (for nodes.kernel_epoch);
--   total_*:  everything the ledger ever counted for this client;
--   base_*:   total_* at the start of the current period (the last reset).
-- Visible usage = total - base. The cursor is written in the same transaction as the usage it
-- produced, so a restart resumes exactly where the last commit ended.
CREATE TABLE clients (
    node_id TEXT NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    ip TEXT NOT NULL,
    first_seen_unix_ms BIGINT NOT NULL,
    last_seen_unix_ms BIGINT,
    period_started_unix_ms BIGINT NOT NULL,
    cursor_up_bytes BIGINT NOT NULL,
    cursor_up_packets BIGINT NOT NULL,
    cursor_down_bytes BIGINT NOT NULL,
    cursor_down_packets BIGINT NOT NULL,
    total_up_bytes BIGINT NOT NULL,
    total_up_packets BIGINT NOT NULL,
    total_down_bytes BIGINT NOT NULL,
    total_down_packets BIGINT NOT NULL,
    base_up_bytes BIGINT NOT NULL,
    base_up_packets BIGINT NOT NULL,
    base_down_bytes BIGINT NOT NULL,
    base_down_packets BIGINT NOT NULL,
    PRIMARY KEY (node_id, ip),
    CHECK (base_up_bytes <= total_up_bytes AND base_down_bytes <= total_down_bytes),
    CHECK (base_up_packets <= total_up_packets AND base_down_packets <= total_down_packets)
);

-- Usage history. Bytes and packets are exact sums; peak_*_rate is the highest rate (bytes/s)
-- of any single poll interval in the bucket. Minute rows are written with each batch; hour rows
-- are rolled up from minute rows once an hour has passed, day rows from hour rows (see
-- nodes.*_rolled_until_ms); reads combine both for the current hour and day.
CREATE TABLE usage_minute (
    node_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    start_unix_ms BIGINT NOT NULL,
    up_bytes BIGINT NOT NULL,
    up_packets BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    down_packets BIGINT NOT NULL,
    peak_up_rate DOUBLE PRECISION NOT NULL,
    peak_down_rate DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node_id, ip, start_unix_ms),
    FOREIGN KEY (node_id, ip) REFERENCES clients (node_id, ip) ON DELETE CASCADE
);

CREATE TABLE usage_hour (
    node_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    start_unix_ms BIGINT NOT NULL,
    up_bytes BIGINT NOT NULL,
    up_packets BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    down_packets BIGINT NOT NULL,
    peak_up_rate DOUBLE PRECISION NOT NULL,
    peak_down_rate DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node_id, ip, start_unix_ms),
    FOREIGN KEY (node_id, ip) REFERENCES clients (node_id, ip) ON DELETE CASCADE
);

CREATE TABLE usage_day (
    node_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    start_unix_ms BIGINT NOT NULL,
    up_bytes BIGINT NOT NULL,
    up_packets BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    down_packets BIGINT NOT NULL,
    peak_up_rate DOUBLE PRECISION NOT NULL,
    peak_down_rate DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node_id, ip, start_unix_ms),
    FOREIGN KEY (node_id, ip) REFERENCES clients (node_id, ip) ON DELETE CASCADE
);

-- Each reset, with the usage of the period it closed.
CREATE TABLE resets (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    at_unix_ms BIGINT NOT NULL,
    period_started_unix_ms BIGINT NOT NULL,
    up_bytes BIGINT NOT NULL,
    up_packets BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    down_packets BIGINT NOT NULL,
    FOREIGN KEY (node_id, ip) REFERENCES clients (node_id, ip) ON DELETE CASCADE
);
CREATE INDEX resets_by_client ON resets (node_id, ip, at_unix_ms);

-- API bearer tokens; only their SHA-256 is stored.
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('read', 'admin')),
    token_sha256 TEXT NOT NULL UNIQUE,
    created_unix_ms BIGINT NOT NULL,
    revoked_unix_ms BIGINT
);

-- Retention deletes by node and age.
CREATE INDEX usage_minute_by_age ON usage_minute (node_id, start_unix_ms);
CREATE INDEX usage_hour_by_age ON usage_hour (node_id, start_unix_ms);
CREATE INDEX usage_day_by_age ON usage_day (node_id, start_unix_ms);

-- Webhooks: a durable outbox. Portable SQL (SQLite and PostgreSQL); times are ms since the epoch.
-- Sequence numbers are assigned by the daemon (MAX(seq) at start, then a counter), not by the
-- database: AUTOINCREMENT and SERIAL are not portable.

-- One row per event. body is the exact JSON that is POSTed (built once, at enqueue time), so
-- every retry sends the same bytes.
CREATE TABLE webhook_events (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    -- ordering key: events of one subject reach each endpoint in seq order
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX webhook_events_by_subject ON webhook_events (node_id, subject, seq);

-- One row per event and endpoint that wants it. Pending while delivered_unix_ms IS NULL.
-- subject is copied from the event so that "is there an older pending event of this subject"
-- needs no join.
CREATE TABLE webhook_outbox (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    endpoint TEXT NOT NULL,
    subject TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_unix_ms BIGINT NOT NULL,
    delivered_unix_ms BIGINT,
    last_error TEXT,
    -- HTTP status of the last attempt (NULL: no response)
    last_status BIGINT,
    PRIMARY KEY (node_id, endpoint, seq),
    FOREIGN KEY (node_id, seq) REFERENCES webhook_events (node_id, seq) ON DELETE CASCADE
);
-- The head of each (endpoint, subject) queue, and the next due head per endpoint.
CREATE INDEX webhook_outbox_pending ON webhook_outbox (node_id, endpoint, subject, seq)
    WHERE delivered_unix_ms IS NULL;
CREATE INDEX webhook_outbox_due ON webhook_outbox (node_id, endpoint, next_attempt_unix_ms)
    WHERE delivered_unix_ms IS NULL;

-- The delivery log: one row per attempt (attempt = 1, 2, ... per event and endpoint).
-- status: the HTTP status, NULL when there was no response (refused, timeout); error: why the
-- attempt failed, NULL on success. No foreign key: the log is written after the request, and
-- must never fail because of it.
CREATE TABLE webhook_attempts (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    endpoint TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at_unix_ms BIGINT NOT NULL,
    status BIGINT,
    error TEXT,
    duration_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, endpoint, seq, attempt)
);
CREATE INDEX webhook_attempts_by_time ON webhook_attempts (node_id, at_unix_ms);
CREATE INDEX webhook_attempts_by_event ON webhook_attempts (node_id, seq);

-- One schema for SQLite and PostgreSQL: TEXT, BIGINT and DOUBLE PRECISION mean the same in
-- both. Times are milliseconds since the Unix epoch; JSON is stored as TEXT.

CREATE TABLE api_keys (
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    scopes     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    agent_id     TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    framework    TEXT,
    version      TEXT,
    capabilities TEXT NOT NULL,
    metadata     TEXT NOT NULL,
    status       TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    last_seen_at BIGINT
);
CREATE INDEX agents_status ON agents (status);
CREATE INDEX agents_framework ON agents (framework);

CREATE TABLE events (
    agent_id    TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    ts          BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    -- Copied out of `data` at ingestion so that metrics need no JSON functions.
    tool        TEXT,
    rule        TEXT,
    duration_ms BIGINT,
    success     BIGINT,
    data        TEXT NOT NULL,
    context     TEXT NOT NULL,
    PRIMARY KEY (agent_id, event_id)
);
CREATE INDEX events_agent_ts ON events (agent_id, ts);
CREATE INDEX events_ts ON events (ts);

CREATE TABLE policies (
    policy_id  TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    version    BIGINT NOT NULL,
    document   TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE policy_versions (
    policy_id  TEXT NOT NULL REFERENCES policies (policy_id) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    document   TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (policy_id, version)
);

CREATE TABLE agent_policies (
    agent_id   TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    policy_id  TEXT NOT NULL REFERENCES policies (policy_id) ON DELETE CASCADE,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, policy_id)
);
CREATE INDEX agent_policies_policy ON agent_policies (policy_id);

CREATE TABLE anomalies (
    anomaly_id   TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    anomaly_type TEXT NOT NULL,
    score        DOUBLE PRECISION NOT NULL,
    description  TEXT NOT NULL,
    details      TEXT NOT NULL,
    detected_at  BIGINT NOT NULL
);
CREATE INDEX anomalies_agent_detected ON anomalies (agent_id, detected_at);

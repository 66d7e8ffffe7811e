-- Monitoring: per-minute rollups kept at ingestion, so that metrics over any range read at
-- most a row per minute (and a row per tool and minute) instead of every event; anomaly
-- severity; and the `action` of violations for counts per decision.

ALTER TABLE events ADD COLUMN action TEXT;

ALTER TABLE anomalies RENAME COLUMN details TO evidence;
ALTER TABLE anomalies ADD COLUMN severity TEXT NOT NULL DEFAULT 'low';

-- One row per agent and minute (`minute`: its first millisecond). Tool executions: how many,
-- how many failed, how many reported a duration and their sum; the durations' histogram, h0
-- for under 1 ms, h1 for [1, 2) ms, ... h36 for 1,000,000 ms and more (the bounds are
-- `LATENCY_BOUNDS_MS` in src/store/rollups.rs). Violations: how many, by rule type and by
-- action.
CREATE TABLE metric_minutes (
    agent_id    TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    minute      BIGINT NOT NULL,
    requests    BIGINT NOT NULL,
    errors      BIGINT NOT NULL,
    timed       BIGINT NOT NULL,
    latency_sum BIGINT NOT NULL,
    h0          BIGINT NOT NULL,
    h1          BIGINT NOT NULL,
    h2          BIGINT NOT NULL,
    h3          BIGINT NOT NULL,
    h4          BIGINT NOT NULL,
    h5          BIGINT NOT NULL,
    h6          BIGINT NOT NULL,
    h7          BIGINT NOT NULL,
    h8          BIGINT NOT NULL,
    h9          BIGINT NOT NULL,
    h10         BIGINT NOT NULL,
    h11         BIGINT NOT NULL,
    h12         BIGINT NOT NULL,
    h13         BIGINT NOT NULL,
    h14         BIGINT NOT NULL,
    h15         BIGINT NOT NULL,
    h16         BIGINT NOT NULL,
    h17         BIGINT NOT NULL,
    h18         BIGINT NOT NULL,
    h19         BIGINT NOT NULL,
    h20         BIGINT NOT NULL,
    h21         BIGINT NOT NULL,
    h22         BIGINT NOT NULL,
    h23         BIGINT NOT NULL,
    h24         BIGINT NOT NULL,
    h25         BIGINT NOT NULL,
    h26         BIGINT NOT NULL,
    h27         BIGINT NOT NULL,
    h28         BIGINT NOT NULL,
    h29         BIGINT NOT NULL,
    h30         BIGINT NOT NULL,
    h31         BIGINT NOT NULL,
    h32         BIGINT NOT NULL,
    h33         BIGINT NOT NULL,
    h34         BIGINT NOT NULL,
    h35         BIGINT NOT NULL,
    h36         BIGINT NOT NULL,
    violations  BIGINT NOT NULL,
    v_tool_restriction  BIGINT NOT NULL,
    v_execution_limit   BIGINT NOT NULL,
    v_content_filter    BIGINT NOT NULL,
    v_memory_protection BIGINT NOT NULL,
    a_blocked   BIGINT NOT NULL,
    a_redacted  BIGINT NOT NULL,
    a_alerted   BIGINT NOT NULL,
    PRIMARY KEY (agent_id, minute)
);

-- The same per tool (its first 200 characters; '' for events that name none).
CREATE TABLE metric_minutes_tools (
    agent_id    TEXT NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    minute      BIGINT NOT NULL,
    tool        TEXT NOT NULL,
    requests    BIGINT NOT NULL,
    errors      BIGINT NOT NULL,
    timed       BIGINT NOT NULL,
    latency_sum BIGINT NOT NULL,
    violations  BIGINT NOT NULL,
    PRIMARY KEY (agent_id, minute, tool)
);

-- BACKFILL: rollups of the events stored before this migration (a test runs the statements
-- from here on against events stored since, and compares).
INSERT INTO metric_minutes (agent_id, minute, requests, errors, timed, latency_sum, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, h16, h17, h18, h19, h20, h21, h22, h23, h24, h25, h26, h27, h28, h29, h30, h31, h32, h33, h34, h35, h36, violations, v_tool_restriction, v_execution_limit, v_content_filter, v_memory_protection, a_blocked, a_redacted, a_alerted)
SELECT
    agent_id,
    ts - ((ts % 60000) + 60000) % 60000,
    SUM(CASE WHEN event_type = 'tool_execution' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND success = 0 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms IS NOT NULL THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms IS NOT NULL THEN duration_ms ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms < 1 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 1 AND duration_ms < 2 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 2 AND duration_ms < 3 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 3 AND duration_ms < 5 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 5 AND duration_ms < 7 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 7 AND duration_ms < 10 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 10 AND duration_ms < 15 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 15 AND duration_ms < 20 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 20 AND duration_ms < 30 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 30 AND duration_ms < 50 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 50 AND duration_ms < 70 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 70 AND duration_ms < 100 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 100 AND duration_ms < 150 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 150 AND duration_ms < 200 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 200 AND duration_ms < 300 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 300 AND duration_ms < 500 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 500 AND duration_ms < 700 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 700 AND duration_ms < 1000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 1000 AND duration_ms < 1500 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 1500 AND duration_ms < 2000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 2000 AND duration_ms < 3000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 3000 AND duration_ms < 5000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 5000 AND duration_ms < 7000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 7000 AND duration_ms < 10000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 10000 AND duration_ms < 15000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 15000 AND duration_ms < 20000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 20000 AND duration_ms < 30000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 30000 AND duration_ms < 50000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 50000 AND duration_ms < 70000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 70000 AND duration_ms < 100000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 100000 AND duration_ms < 150000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 150000 AND duration_ms < 200000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 200000 AND duration_ms < 300000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 300000 AND duration_ms < 500000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 500000 AND duration_ms < 700000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 700000 AND duration_ms < 1000000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms >= 1000000 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND rule = 'tool_restriction' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND rule = 'execution_limit' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND rule = 'content_filter' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND rule = 'memory_protection' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND action = 'blocked' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND action = 'redacted' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' AND action = 'alerted' THEN 1 ELSE 0 END)
FROM events WHERE event_type IN ('tool_execution', 'policy_violation')
GROUP BY agent_id, ts - ((ts % 60000) + 60000) % 60000;

INSERT INTO metric_minutes_tools (agent_id, minute, tool, requests, errors, timed, latency_sum, violations)
SELECT
    agent_id,
    ts - ((ts % 60000) + 60000) % 60000,
    SUBSTR(COALESCE(tool, ''), 1, 200),
    SUM(CASE WHEN event_type = 'tool_execution' THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND success = 0 THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms IS NOT NULL THEN 1 ELSE 0 END),
    SUM(CASE WHEN event_type = 'tool_execution' AND duration_ms IS NOT NULL THEN duration_ms ELSE 0 END),
    SUM(CASE WHEN event_type = 'policy_violation' THEN 1 ELSE 0 END)
FROM events WHERE event_type IN ('tool_execution', 'policy_violation')
GROUP BY agent_id, ts - ((ts % 60000) + 60000) % 60000, SUBSTR(COALESCE(tool, ''), 1, 200);

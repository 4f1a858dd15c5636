-- Jobs: one unit of work a tenant asked for (a plugin call, a factory run), its events and its
-- output artifact. Portable between SQLite and PostgreSQL.
CREATE TABLE jobs (
    -- `job_` + creation time (ms, hex) + random: ids sort by creation.
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('call', 'run')),
    input           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    idempotency_key TEXT,
    -- SHA-256 of (kind, input, priority): a reused idempotency key must come with the same request.
    request_hash    TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    output          TEXT,
    error           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
-- NULL keys are distinct in both databases, so jobs without a key never collide.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key);
CREATE INDEX jobs_tenant ON jobs (tenant_id, id);
CREATE INDEX jobs_status ON jobs (status);

CREATE TABLE job_events (
    job_id  TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- A finished job's downloadable output (a run's tar.gz capsule). BYTEA has blob storage in SQLite.
CREATE TABLE job_artifacts (
    job_id      TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    media_type  TEXT NOT NULL,
    bytes       BYTEA NOT NULL
);

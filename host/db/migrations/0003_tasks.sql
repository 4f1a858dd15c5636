-- The core scheduler: every job is a DAG of tasks. A task is leased by one node at a time
-- (lease_owner until lease_expires); `attempts` counts leases and fences late completions.
CREATE TABLE tasks (
    -- `<job id>.<index>`: ids sort by submission, then by position in the job.
    id            TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    tenant_id     TEXT NOT NULL,
    -- The task's name in its job (unique within it).
    name          TEXT NOT NULL,
    -- `call` (invoke a tool plugin) or `run` (the factory pipeline).
    kind          TEXT NOT NULL,
    -- The plugin it calls: its circuit breaker's key with the tenant.
    plugin        TEXT NOT NULL,
    input         TEXT NOT NULL,
    -- JSON array of the names of the tasks whose output it waits for.
    depends_on    TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('waiting', 'ready', 'leased', 'succeeded', 'failed', 'cancelled')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    -- A retry's backoff: not to start before this (unix ms).
    not_before    BIGINT NOT NULL,
    -- The job's deadline (unix ms), copied: a task past it is not started and a running one stops.
    deadline_at   BIGINT,
    lease_owner   TEXT,
    -- 1 once a lease on it was handed back or lost (the next run of it resumes interrupted work).
    resumed       INTEGER NOT NULL DEFAULT 0,
    lease_expires BIGINT,
    output        TEXT,
    error         TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX tasks_job ON tasks (job_id);
CREATE INDEX tasks_status ON tasks (status, not_before);
CREATE INDEX tasks_lease ON tasks (lease_owner, status);
CREATE INDEX tasks_tenant_status ON tasks (tenant_id, status);

-- The job's deadline, and how many tasks it has.
ALTER TABLE jobs ADD COLUMN deadline_at BIGINT;
ALTER TABLE jobs ADD COLUMN task_count INTEGER NOT NULL DEFAULT 1;

-- A tenant's share of the scheduler (relative weight) and its own cap on running tasks
-- (0: the host's default).
ALTER TABLE tenants ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
ALTER TABLE tenants ADD COLUMN max_running INTEGER NOT NULL DEFAULT 0;

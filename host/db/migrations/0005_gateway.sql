-- The gateway: each tenant's model table (a model name and its deployments), and one usage
-- record per gateway request, written in batches off the request path.
CREATE TABLE models (
    tenant_id  TEXT NOT NULL,
    -- The name clients ask for (`model` in a request).
    name       TEXT NOT NULL,
    -- The entry (JSON): routing strategy and deployments (plugin, upstream model, weight, prices,
    -- limits). The gateway validates it; the store only keys it.
    spec       TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE usage_records (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    -- `chat`, `messages` or `embeddings`.
    endpoint          TEXT NOT NULL,
    model             TEXT NOT NULL,
    -- `plugin/upstream-model` of the deployment that answered (empty when none did).
    deployment        TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    -- In billionths of the price table's currency unit.
    cost_nanos        BIGINT NOT NULL,
    latency_us        BIGINT NOT NULL,
    -- Time to first token of a stream; NULL for a whole answer.
    ttft_us           BIGINT,
    -- `miss`, `hit` or `skip`.
    cache             TEXT NOT NULL,
    -- `ok`, or the error code the client got.
    status            TEXT NOT NULL,
    at                BIGINT NOT NULL
);
CREATE INDEX usage_records_tenant_at ON usage_records (tenant_id, at);

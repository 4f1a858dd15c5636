-- Gateway limits and budgets (issue 16). Limits are configuration: a tenant's own (key_id '') and
-- each of its keys'. Quota is leased to nodes in grants: a node asks for a chunk of a limit's
-- key, the store grants it only while every grant still alive plus this one stays within the
-- limit, and the node admits requests from it in memory. A grant counts until `alive_until`
-- (the store's clock): for a sliding minute, its lease time plus the minute; for a day or a
-- month, past the period's end (the period is part of the key).
CREATE TABLE quota_limits (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- '' for the tenant's own limits, else one of its keys.
    key_id        TEXT NOT NULL,
    -- NULL: no limit of that kind.
    rpm           BIGINT,
    tpm           BIGINT,
    -- Budgets, in billionths of the price table's currency unit.
    daily_nanos   BIGINT,
    monthly_nanos BIGINT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key_id)
);

-- One row per limit key, locked by each grant's transaction so that grants of one key are
-- decided one after the other on every node.
CREATE TABLE quota_keys (
    key     TEXT PRIMARY KEY,
    touched BIGINT NOT NULL
);

CREATE TABLE quota_grants (
    id          TEXT PRIMARY KEY,
    key         TEXT NOT NULL,
    -- What is granted, less what was given back.
    amount      BIGINT NOT NULL,
    granted_at  BIGINT NOT NULL,
    alive_until BIGINT NOT NULL
);
CREATE INDEX quota_grants_key ON quota_grants (key, alive_until);

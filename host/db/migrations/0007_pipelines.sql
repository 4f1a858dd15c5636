-- Factory pipelines stored for a tenant (`PUT /v1/pipelines/{name}`), named in runs.
CREATE TABLE pipelines (
    tenant_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    -- The definition as JSON; the factory checks it before it is stored.
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

-- Plugins installed per tenant from the marketplace, pinned by digest. Every node sharing the
-- database sees the same installs; a node whose local store lacks the binary pulls it from the
-- registry by its pinned digest on first use.
CREATE TABLE installs (
    -- The tenant's name (the CLI's tenants are names only).
    tenant       TEXT NOT NULL,
    -- The plugin's name, from its manifest.
    name         TEXT NOT NULL,
    -- The plugin binary's digest: what the local blob stores hold.
    blob         TEXT NOT NULL,
    -- The install record (JSON): version, kind, format, repository, tag, manifest digest, grants
    -- (secret grants name environment variables, never values), signature check.
    record       TEXT NOT NULL,
    installed_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX installs_blob ON installs (blob);

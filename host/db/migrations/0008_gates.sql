-- Approval gates: when a factory run's gate task is reached (its step and validators done), the
-- run waits for a person's decision. The gate task stays `waiting` (no lease, no slot) and the
-- job records since when it waits; the API shows such a running job as `waiting`.
ALTER TABLE jobs ADD COLUMN waiting_at BIGINT;

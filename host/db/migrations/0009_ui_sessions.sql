-- Dashboard sessions (`/ui`): a person signs in with an API key and gets a random session token
-- in an HttpOnly cookie. Only the token's SHA-256 is stored; the session acts as the key it was
-- opened with, so revoking the key ends it, and it ends by itself at `expires_at`.
CREATE TABLE ui_sessions (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    -- The session's anti-forgery token, sent back in every form.
    csrf       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);

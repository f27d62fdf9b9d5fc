"""The database schema: every migration, in order (applied by store.py).

MIGRATIONS[n - 1] brings a database from schema version n - 1 to n in one transaction;
a released migration is never edited, only followed by a new one.
"""

from __future__ import annotations

# Every UPDATE of these `keys` columns bumps the auth revision. `last_used_at` is left out
# on purpose: the daemon writes it on use and must not trigger its own snapshot reload.
# A migration that adds a column to `keys` must recreate `keys_auth_update` with it.
_KEY_AUTH_COLUMNS = ("key_id", "tenant_id", "label", "hash", "created_at", "expires_at",
                     "revoked_at", "allow_all_models", "requests_per_min", "tokens_per_min",
                     "token_budget", "budget_period", "max_concurrent", "log_prompts")

_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'auth_revision';"

# The limit columns (limits.py writes and reads them). `keys`: NULL = the config default
# (limits.key_defaults), 0 = no limit for this key whatever the default, n > 0 = n.
# `tenants`: NULL (or 0) = no limit, n > 0 = n. 0 was always storable, so giving it a meaning
# needed no migration; limits.py refuses every other value before it is written.
_V1 = f"""
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('auth_revision', 0);

CREATE TABLE tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    allow_all_models INTEGER NOT NULL DEFAULT 0,
    tokens_per_min INTEGER,
    token_budget INTEGER,
    budget_period TEXT CHECK (budget_period IN ('day', 'month')),
    max_concurrent INTEGER,
    weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1),
    created_at REAL NOT NULL
);

CREATE TABLE tenant_models (
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    PRIMARY KEY (tenant_id, model)
);

-- No ON DELETE CASCADE: deleting a tenant that still has keys must be deliberate.
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    label TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL,
    allow_all_models INTEGER,
    requests_per_min INTEGER,
    tokens_per_min INTEGER,
    token_budget INTEGER,
    budget_period TEXT,
    max_concurrent INTEGER,
    log_prompts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX keys_tenant ON keys (tenant_id);

CREATE TRIGGER tenants_auth_insert AFTER INSERT ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenants_auth_update AFTER UPDATE ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenants_auth_delete AFTER DELETE ON tenants BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_insert AFTER INSERT ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_update AFTER UPDATE ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER tenant_models_auth_delete AFTER DELETE ON tenant_models BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_insert AFTER INSERT ON keys BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_update AFTER UPDATE OF {", ".join(_KEY_AUTH_COLUMNS)} ON keys
BEGIN {_BUMP} END;
CREATE TRIGGER keys_auth_delete AFTER DELETE ON keys BEGIN {_BUMP} END;
"""

# The audit log (SPEC §10; auditchain.py defines the hash chain). Rows are only ever
# appended, with consecutive ids, each extending the chain from the row before it (or from
# the anchor). The only rows that may be deleted are those a prune has already moved the
# anchor past, and only inside the prune's own transaction: `audit_prune_token` holds a row
# only between the prune's INSERT and DELETE of it, before COMMIT, so no other connection
# ever sees one (SQLite has no session variables). These triggers stop mistakes and other
# programs, not the file's owner, who can drop them: `audit verify` is the real check.
_ZERO_HASH = "0" * 64
_NOT_APPENDED = "audit rows can only be appended, extending the hash chain"
_APPEND_ONLY = "audit rows are append-only (use neuraldrive-gw audit prune)"

_V2 = f"""
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused, even after a prune
    request_id TEXT NOT NULL,
    at REAL NOT NULL,                          -- when the request arrived (epoch seconds)
    key_id TEXT,
    tenant TEXT,                               -- tenant name; NULL for the master key
    client_ip TEXT,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,                                -- canonical (installed) model name
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    stream INTEGER NOT NULL CHECK (stream IN (0, 1)),
    prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    metering TEXT NOT NULL CHECK (metering IN ('exact', 'estimated', 'none')),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    ttfb_ms INTEGER,
    duration_ms INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_key_at ON audit (key_id, at);
CREATE INDEX audit_tenant_at ON audit (tenant, at);

-- Where the chain starts: the id and hash of the last pruned row (0 and zeros before any).
CREATE TABLE audit_anchor (
    only INTEGER PRIMARY KEY CHECK (only = 1),
    last_id INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    pruned_rows INTEGER NOT NULL DEFAULT 0,
    pruned_at REAL
);
INSERT INTO audit_anchor (only, last_id, last_hash) VALUES (1, 0, '{_ZERO_HASH}');

CREATE TABLE audit_prune_token (pid INTEGER NOT NULL);

CREATE TRIGGER audit_append BEFORE INSERT ON audit
WHEN NEW.id IS NOT coalesce((SELECT max(id) FROM audit),
                            (SELECT last_id FROM audit_anchor)) + 1
  OR NEW.prev_hash IS NOT coalesce((SELECT row_hash FROM audit ORDER BY id DESC LIMIT 1),
                                   (SELECT last_hash FROM audit_anchor))
BEGIN SELECT RAISE(ABORT, '{_NOT_APPENDED}'); END;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN NOT EXISTS (SELECT 1 FROM audit_prune_token)
  OR OLD.id > (SELECT last_id FROM audit_anchor)
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END;

CREATE TRIGGER audit_anchor_update BEFORE UPDATE ON audit_anchor
WHEN NOT EXISTS (SELECT 1 FROM audit_prune_token)
  OR NEW.only IS NOT 1 OR NEW.last_id <= OLD.last_id
  OR NOT EXISTS (SELECT 1 FROM audit WHERE id = NEW.last_id AND row_hash = NEW.last_hash)
BEGIN SELECT RAISE(ABORT, 'the audit anchor only moves forward onto a row, in a prune'); END;

CREATE TRIGGER audit_anchor_no_delete BEFORE DELETE ON audit_anchor
BEGIN SELECT RAISE(ABORT, 'the audit anchor cannot be deleted'); END;
"""

# The prompt log (SPEC §10; promptlog.py): opted-in keys' request and answer text, after
# redaction, until `expires_at`. Not part of the audit chain: rows are deleted when they
# expire (in batches, by the daemon's purge task) and may be deleted by the operator.
_V3 = """
CREATE TABLE prompt_log (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    at REAL NOT NULL,
    expires_at REAL NOT NULL,
    key_id TEXT NOT NULL,
    tenant TEXT,
    route TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    request_text TEXT NOT NULL,
    response_text TEXT NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0 CHECK (truncated IN (0, 1))
);
CREATE INDEX prompt_log_expires ON prompt_log (expires_at);
CREATE INDEX prompt_log_key_at ON prompt_log (key_id, at);
"""

# Covering indexes for the token sums per key and per tenant: `neuraldrive-gw usage` and
# the budget ledger the daemon rebuilds from the audit log at start-up (spend.spend_in_periods).
# Each reads its columns from the index alone, in GROUP BY order, where (key_id, at) and
# (tenant, at) cost one table lookup per row. With 1,000,000 rows (bench/scale.py) the
# `usage` queries took 3-10 s, now 0.2 s; the start-up query 5-8 s over a month of rows,
# now 0.3 s. They replace those two indexes, which nothing needs besides them: (tenant, at)
# is a prefix of the new tenant index, and a key's rows are few enough to scan for an
# `at` range after (key_id, tenant). Writing a row costs about 5 µs more CPU; building
# them for 1,000,000 rows takes about 4.5 s, once.
_V4 = """
DROP INDEX audit_key_at;
DROP INDEX audit_tenant_at;
CREATE INDEX audit_key_usage
    ON audit (key_id, tenant, at, prompt_tokens, completion_tokens, metering);
CREATE INDEX audit_tenant_usage
    ON audit (tenant, at, key_id, prompt_tokens, completion_tokens, metering);
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4)
SCHEMA_VERSION: int = len(MIGRATIONS)

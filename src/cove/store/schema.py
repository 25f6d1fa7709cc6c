"""Tables. The migration in ``migrations/versions`` creates exactly these; a test keeps the
two in step (``alembic check`` semantics)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

revision_counter = Table(
    "revision_counter",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

resources = Table(
    "resources",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("name", String(64), nullable=False),
    Column("parent_kind", String(20), nullable=True),
    Column("parent_id", String(40), nullable=True),
    Column("parent_name", String(64), nullable=True),
    # '' for top-level resources, so the unique constraint below also covers them
    Column("parent_key", String(40), nullable=False),
    # ancestry, denormalised so any kind can be listed by org/project/app/environment
    Column("org_id", String(40), nullable=True),
    Column("project_id", String(40), nullable=True),
    Column("app_id", String(40), nullable=True),
    Column("env_id", String(40), nullable=True),
    Column("labels", JSON, nullable=False),
    Column("spec", JSON, nullable=False),
    Column("status", JSON, nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("deleting", Boolean, nullable=False, default=False),
    UniqueConstraint("kind", "parent_key", "name", name="uq_resources_kind_parent_name"),
)
Index("ix_resources_revision", resources.c.revision)
Index("ix_resources_kind_org", resources.c.kind, resources.c.org_id, resources.c.id)
Index("ix_resources_parent", resources.c.parent_id)
Index("ix_resources_env", resources.c.env_id)

events = Table(
    "events",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("dedup_key", String(64), nullable=False, unique=True),
    Column("object_kind", String(20), nullable=False),
    Column("object_id", String(40), nullable=False),
    Column("object_name", String(64), nullable=False),
    Column("org_id", String(40), nullable=True),
    Column("project_id", String(40), nullable=True),
    Column("app_id", String(40), nullable=True),
    Column("env_id", String(40), nullable=True),
    Column("type", String(10), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("count", Integer, nullable=False),
    Column("first_seen", String(32), nullable=False),
    Column("last_seen", String(32), nullable=False),
    Column("revision", BigInteger, nullable=False),
)
Index("ix_events_revision", events.c.revision)
Index("ix_events_object", events.c.object_id, events.c.revision)
Index("ix_events_org_revision", events.c.org_id, events.c.revision)

users = Table(
    "users",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", String(32), nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", String(40), primary_key=True),
    Column("org_id", String(40), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("created_at", String(32), nullable=False),
)
Index("ix_memberships_org", memberships.c.org_id)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("kind", String(10), nullable=False),  # session | api | node
    Column("name", String(64), nullable=False),
    Column("user_id", String(40), nullable=True),
    Column("org_id", String(40), nullable=True),
    Column("node_id", String(40), nullable=True),
    Column("created_at", String(32), nullable=False),
    Column("expires_at", String(32), nullable=True),
    Column("last_used_at", String(32), nullable=True),
    Column("revoked_at", String(32), nullable=True),
)
Index("ix_tokens_user", tokens.c.user_id)

cluster_settings = Table(
    "cluster_settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# -- deploys (migration 0002) -------------------------------------------------------------

secret_versions = Table(
    "secret_versions",
    metadata,
    Column("bundle_id", String(40), primary_key=True),
    Column("version", Integer, primary_key=True),
    # envelope: a fresh AES-256-GCM data key per version, wrapped by the server's master key
    Column("wrapped_key", Text, nullable=False),
    Column("nonce", String(32), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
)

registry_credentials = Table(
    "registry_credentials",
    metadata,
    Column("org_id", String(40), primary_key=True),
    Column("host", String(255), primary_key=True),
    Column("username", String(255), nullable=False),
    Column("wrapped_key", Text, nullable=False),
    Column("nonce", String(32), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
)

log_lines = Table(
    "log_lines",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("instance_id", String(40), nullable=False),
    Column("org_id", String(40), nullable=True),
    Column("env_id", String(40), nullable=True),
    Column("workload", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("ts", String(32), nullable=False),
    Column("stream", String(8), nullable=False),
    Column("line", Text, nullable=False),
    UniqueConstraint("instance_id", "seq", name="uq_log_lines_instance_seq"),
)
Index("ix_log_lines_env", log_lines.c.env_id, log_lines.c.id)
Index("ix_log_lines_instance", log_lines.c.instance_id, log_lines.c.id)

# -- endpoints (migration 0003) -----------------------------------------------------------

public_addresses = Table(
    "public_addresses",
    metadata,
    # the primary key is the guarantee: one address, one endpoint, across server replicas
    Column("address", String(45), primary_key=True),
    Column("family", Integer, nullable=False),  # 6 or 4
    Column("endpoint_id", String(40), nullable=False),
    Column("org_id", String(40), nullable=False),
    Column("project_id", String(40), nullable=False),
    Column("allocated_at", String(32), nullable=False),
)
Index("ix_public_addresses_endpoint", public_addresses.c.endpoint_id)
Index("ix_public_addresses_project", public_addresses.c.project_id, public_addresses.c.family)

# -- metering (migration 0004) ------------------------------------------------------------

# One row per span of billable use: an instance from running until it stopped, a volume
# from creation until its deletion was asked, a dedicated IPv4 from allocation to release.
# Written in the same transaction as the change that starts or ends the use, so a restart
# can neither lose nor repeat one. ``open`` is 1 while the span runs and NULL after: the
# unique constraint allows one open span per subject (NULLs never collide).
meter_intervals = Table(
    "meter_intervals",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("meter", String(16), nullable=False),  # instance | volume | ipv4
    Column("subject_id", String(80), nullable=False),
    Column("subject_name", String(80), nullable=False),
    Column("org_id", String(40), nullable=True),
    Column("project_id", String(40), nullable=True),
    Column("app_id", String(40), nullable=True),
    Column("env_id", String(40), nullable=True),
    Column("size", String(16), nullable=False),  # instance size; '' otherwise
    # instance: cpu millis; volume: GB provisioned; ipv4: 1
    Column("quantity", BigInteger, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=True),
    Column("open", Integer, nullable=True),
    UniqueConstraint("subject_id", "open", name="uq_meter_intervals_open"),
)
Index("ix_meter_intervals_org", meter_intervals.c.org_id, meter_intervals.c.started_ms)
Index("ix_meter_intervals_subject", meter_intervals.c.subject_id)

# Bytes the edge sent to clients, per node, endpoint and hour (ms of the hour's start).
meter_egress = Table(
    "meter_egress",
    metadata,
    Column("node_id", String(40), primary_key=True),
    Column("endpoint_id", String(40), primary_key=True),
    Column("hour_ms", BigInteger, primary_key=True),
    Column("org_id", String(40), nullable=True),
    Column("project_id", String(40), nullable=True),
    Column("app_id", String(40), nullable=True),
    Column("env_id", String(40), nullable=True),
    Column("bytes", BigInteger, nullable=False),
)
Index("ix_meter_egress_org", meter_egress.c.org_id, meter_egress.c.hour_ms)

# The last counter value each node's edge reported per endpoint, and the edge's epoch (a
# fresh ID each time the edge starts, when its counters restart from 0): a report adds
# only what is new since the last one, so a repeated report adds nothing.
meter_counters = Table(
    "meter_counters",
    metadata,
    Column("node_id", String(40), primary_key=True),
    Column("endpoint_id", String(40), primary_key=True),
    Column("epoch", String(40), nullable=False),
    Column("bytes_out", BigInteger, nullable=False),
)

# Every price list that was in force, from when: invoices price each span of use with the
# list in force at the time.
price_lists = Table(
    "price_lists",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("effective_ms", BigInteger, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("doc", JSON, nullable=False),
)

# -- liveness (migration 0005) ------------------------------------------------------------

# When each node's agent last reported. Not a resource: no revision, no event, no wake-up;
# a heartbeat is one upsert of this row (``Store.heartbeat``) and does not take the
# revision counter, so 500 nodes beating every 5 s do not queue behind (or in front of)
# real writes. Readers overlay ``at`` onto the node's ``status.last_heartbeat``. No foreign
# key (a heartbeat must not lock the node's row): deleting the node deletes its row
# (``Tx.delete``), and readers only look at rows of nodes that exist.
node_heartbeats = Table(
    "node_heartbeats",
    metadata,
    Column("node_id", String(40), primary_key=True),
    Column("at", String(32), nullable=False),
)

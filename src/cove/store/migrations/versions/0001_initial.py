"""initial schema: resources, events, users, memberships, tokens, settings

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revision_counter",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO revision_counter (id, value) VALUES (1, 0)")
    op.create_table(
        "resources",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("parent_kind", sa.String(20), nullable=True),
        sa.Column("parent_id", sa.String(40), nullable=True),
        sa.Column("parent_name", sa.String(64), nullable=True),
        sa.Column("parent_key", sa.String(40), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("project_id", sa.String(40), nullable=True),
        sa.Column("app_id", sa.String(40), nullable=True),
        sa.Column("env_id", sa.String(40), nullable=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("deleting", sa.Boolean, nullable=False),
        sa.UniqueConstraint("kind", "parent_key", "name", name="uq_resources_kind_parent_name"),
    )
    op.create_index("ix_resources_revision", "resources", ["revision"])
    op.create_index("ix_resources_kind_org", "resources", ["kind", "org_id", "id"])
    op.create_index("ix_resources_parent", "resources", ["parent_id"])
    op.create_index("ix_resources_env", "resources", ["env_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("dedup_key", sa.String(64), nullable=False, unique=True),
        sa.Column("object_kind", sa.String(20), nullable=False),
        sa.Column("object_id", sa.String(40), nullable=False),
        sa.Column("object_name", sa.String(64), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("project_id", sa.String(40), nullable=True),
        sa.Column("app_id", sa.String(40), nullable=True),
        sa.Column("env_id", sa.String(40), nullable=True),
        sa.Column("type", sa.String(10), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.String(32), nullable=False),
        sa.Column("last_seen", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_events_revision", "events", ["revision"])
    op.create_index("ix_events_object", "events", ["object_id", "revision"])
    op.create_index("ix_events_org_revision", "events", ["org_id", "revision"])
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(40), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_index("ix_memberships_org", "memberships", ["org_id"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(40), nullable=True),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("node_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=True),
        sa.Column("last_used_at", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.String(32), nullable=True),
    )
    op.create_index("ix_tokens_user", "tokens", ["user_id"])
    op.create_table(
        "cluster_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "cluster_settings",
        "tokens",
        "memberships",
        "users",
        "events",
        "resources",
        "revision_counter",
    ):
        op.drop_table(table)

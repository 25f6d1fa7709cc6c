"""metering: spans of billable use, egress counters and the price lists in force

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meter_intervals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("meter", sa.String(16), nullable=False),
        sa.Column("subject_id", sa.String(80), nullable=False),
        sa.Column("subject_name", sa.String(80), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("project_id", sa.String(40), nullable=True),
        sa.Column("app_id", sa.String(40), nullable=True),
        sa.Column("env_id", sa.String(40), nullable=True),
        sa.Column("size", sa.String(16), nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("started_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_ms", sa.BigInteger, nullable=True),
        sa.Column("open", sa.Integer, nullable=True),
        sa.UniqueConstraint("subject_id", "open", name="uq_meter_intervals_open"),
    )
    op.create_index("ix_meter_intervals_org", "meter_intervals", ["org_id", "started_ms"])
    op.create_index("ix_meter_intervals_subject", "meter_intervals", ["subject_id"])
    op.create_table(
        "meter_egress",
        sa.Column("node_id", sa.String(40), primary_key=True),
        sa.Column("endpoint_id", sa.String(40), primary_key=True),
        sa.Column("hour_ms", sa.BigInteger, primary_key=True),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("project_id", sa.String(40), nullable=True),
        sa.Column("app_id", sa.String(40), nullable=True),
        sa.Column("env_id", sa.String(40), nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_meter_egress_org", "meter_egress", ["org_id", "hour_ms"])
    op.create_table(
        "meter_counters",
        sa.Column("node_id", sa.String(40), primary_key=True),
        sa.Column("endpoint_id", sa.String(40), primary_key=True),
        sa.Column("epoch", sa.String(40), nullable=False),
        sa.Column("bytes_out", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "price_lists",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("effective_ms", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("doc", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("price_lists")
    op.drop_table("meter_counters")
    op.drop_table("meter_egress")
    op.drop_table("meter_intervals")

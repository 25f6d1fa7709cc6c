"""deploys: secret versions, registry credentials, instance log lines

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secret_versions",
        sa.Column("bundle_id", sa.String(40), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped_key", sa.Text, nullable=False),
        sa.Column("nonce", sa.String(32), nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "registry_credentials",
        sa.Column("org_id", sa.String(40), primary_key=True),
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("wrapped_key", sa.Text, nullable=False),
        sa.Column("nonce", sa.String(32), nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "log_lines",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("instance_id", sa.String(40), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("env_id", sa.String(40), nullable=True),
        sa.Column("workload", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", sa.String(32), nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("line", sa.Text, nullable=False),
        sa.UniqueConstraint("instance_id", "seq", name="uq_log_lines_instance_seq"),
    )
    op.create_index("ix_log_lines_env", "log_lines", ["env_id", "id"])
    op.create_index("ix_log_lines_instance", "log_lines", ["instance_id", "id"])


def downgrade() -> None:
    for table in ("log_lines", "registry_credentials", "secret_versions"):
        op.drop_table(table)

"""endpoints: public addresses allocated from the server's pools

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "public_addresses",
        sa.Column("address", sa.String(45), primary_key=True),
        sa.Column("family", sa.Integer, nullable=False),
        sa.Column("endpoint_id", sa.String(40), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=False),
        sa.Column("project_id", sa.String(40), nullable=False),
        sa.Column("allocated_at", sa.String(32), nullable=False),
    )
    op.create_index("ix_public_addresses_endpoint", "public_addresses", ["endpoint_id"])
    op.create_index("ix_public_addresses_project", "public_addresses", ["project_id", "family"])


def downgrade() -> None:
    op.drop_table("public_addresses")

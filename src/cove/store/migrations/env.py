"""Alembic environment: run with a connection handed over by ``cove.store.migrate``."""

from __future__ import annotations

from alembic import context

from cove.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via `alembic` on the command line
    raise RuntimeError("run migrations through cove (cove server migrates on start)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

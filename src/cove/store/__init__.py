"""The store: SQLAlchemy 2 Core over SQLite (WAL, embedded default) or PostgreSQL."""

from cove.store.db import Store, Tx, resource_from_row

__all__ = ["Store", "Tx", "resource_from_row"]

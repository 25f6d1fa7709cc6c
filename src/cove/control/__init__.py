"""Controllers: level-triggered, idempotent ``reconcile(key) -> requeue_after | None``."""

from cove.control.manager import Controller, Manager, WorkQueue

__all__ = ["Controller", "Manager", "WorkQueue"]

"""The HTTP API (FastAPI). ``create_app`` builds it around a Store."""

from cove.api.app import create_app

__all__ = ["create_app"]

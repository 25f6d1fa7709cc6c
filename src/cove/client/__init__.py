"""Typed HTTP client for the cove API, used by the CLI, the agent and the console."""

from cove.client.http import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]

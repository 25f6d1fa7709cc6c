"""cove: a small developer cloud.

Layers (lower never imports higher): ``model`` <- ``store`` <- ``control`` / ``api``.
The CLI and the agent talk to the server only through ``client``.
"""

__version__ = "0.1.0"

"""The web console: ``/console`` serves a terminal (ghostty-web, libghostty-vt in WASM)
bridged over an authenticated WebSocket to a PTY running ``cove shell`` as the signed-in
user. No forms.

The API wires it in (``create_app``) and hands it the one thing it needs from the API, an
``authenticate(token)`` callable, so this package never imports the API: it knows
``cove.errors`` and starts the CLI as a separate process.
"""

from cove.console.web import (
    CSP,
    SUBPROTOCOL,
    ConsoleConfig,
    ConsoleUser,
    config_from_env,
    ghostty_dist,
    register,
)

__all__ = [
    "CSP",
    "SUBPROTOCOL",
    "ConsoleConfig",
    "ConsoleUser",
    "config_from_env",
    "ghostty_dist",
    "register",
]

"""Built-in hooks: in-process Powerstrip adapters, named in adapters.yml like external ones.

A built-in hook gets exactly the JSON an external Powerstrip adapter would get
(``{"PowerstripProtocolVersion": 1, "Type": "pre-hook" | "post-hook", "ClientRequest": ...,
"ServerResponse": ...}``) and returns exactly what one would answer (``ModifiedClientRequest`` or
``ModifiedServerResponse``). Raising a ``PowerplaneError`` stops the request; the client gets a
Docker-shaped error with that exception's status and message.
"""

from __future__ import annotations

from typing import Any, Protocol

PowerstripMessage = dict[str, Any]


class BuiltinHook(Protocol):
    """One in-process adapter: handles both pre-hook and post-hook messages."""

    async def __call__(self, message: PowerstripMessage) -> PowerstripMessage: ...

"""The parts of aiohttp's private interior codexlb reaches into, all in this one module.

``pyproject.toml`` keeps aiohttp below its next major version; each item here is exercised
through real sockets: ``ClientFrames`` and ``send_uncompressed_by_default`` by
``tests/test_ws_proxy.py::test_deflate_when_enabled_is_negotiated_but_events_go_out_uncompressed``
(raw frames read off codexlb's socket) and every WebSocket test, the mask by
``tests/test_frames.py`` and ``test_a_large_replay_reaches_the_upstream_intact``.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask as websocket_mask

__all__ = ["ClientFrames", "send_uncompressed_by_default", "websocket_mask"]
"""``websocket_mask(key, data)`` masks a ``bytearray`` in place, in C where aiohttp was built
with its extensions."""


def send_uncompressed_by_default(ws: web.WebSocketResponse) -> None:
    """Keep permessage-deflate for what the client sends, but let aiohttp's own messages (its
    close frame, an error codexlb writes through it) go out plain.

    A persistent deflate context costs 100-250 KiB of memory per socket and CPU per frame,
    while codexlb's messages are mostly small events. RFC 7692 lets any message go
    uncompressed (RSV1 clear) on a connection that negotiated the extension. aiohttp has no
    public switch for this, hence the writer attribute.
    """
    writer = ws._writer
    if writer is not None:
        writer.compress = 0


class ClientFrames:
    """Writes whole frames straight to a prepared server-side WebSocket's connection.

    aiohttp writes one message per call, each with its own system call; the relay writes the
    frames that are ready together in one. The frames must be complete, unmasked and
    uncompressed: valid on any server connection, whatever extension it negotiated.
    """

    __slots__ = ("_protocol", "_transport")

    def __init__(self, ws: web.WebSocketResponse) -> None:
        writer = ws._writer
        assert writer is not None, "the WebSocket is not prepared"
        self._transport = writer.transport
        self._protocol = writer.protocol

    async def write(self, data: bytes) -> None:
        """Write ``data``, waiting while the client reads slower than the upstream writes;
        ``ConnectionResetError`` once the connection is closing."""
        if self._transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        self._transport.write(data)
        if self._protocol.writing_paused:
            await self._protocol._drain_helper()

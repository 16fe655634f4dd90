"""``GET /v1/responses/{response_id}``: a stored response, read back from its snapshot.

Only the key that created a response may read it (its scope, S2); another key gets the same
404 as for an id that never existed. The snapshot holds what a completed response is made of,
so the answer has the Responses API's shape with ``status: completed``.
"""

from __future__ import annotations

from aiohttp import web

from codexlb.auth import ClientKeys
from codexlb.errors import NotFound, shown
from codexlb.payload import check_id
from codexlb.store import SnapshotStore


class StoredResponses:
    def __init__(self, store: SnapshotStore, keys: ClientKeys) -> None:
        self._store = store
        self._keys = keys

    async def handle(self, request: web.Request) -> web.Response:
        scope = self._keys.scope_for(request.headers.get("Authorization"))
        response_id = request.match_info["response_id"]
        check_id("response_id", response_id)
        snapshot = await self._store.get(scope, response_id)
        if snapshot is None:
            raise NotFound(
                f"No response found with id '{shown(response_id)}'.", param="response_id"
            )
        return web.json_response(
            {
                "id": snapshot.response_id,
                "object": "response",
                "created_at": int(snapshot.created_at.timestamp()),
                "status": "completed",
                "model": snapshot.model,
                "previous_response_id": snapshot.previous_response_id,
                "output": snapshot.output_items,
                "usage": snapshot.usage,
            }
        )

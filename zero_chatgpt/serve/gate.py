"""The ASGI middleware in front of every route: the API key, the body's size and the time it may take
to arrive, all checked before the body is parsed, so that a huge, slow or unauthenticated request costs
nothing whatever it contains. It also counts the requests in progress, which the shutdown waits for."""
from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse

from zero_chatgpt.serve import api


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _TooBig(Exception):
    pass


class Gate:
    """`state.inflight` counts the HTTP requests being answered (the drain waits for it to reach 0)."""

    def __init__(self, app, api_key: str | None, max_body: int, body_timeout: float, state):
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body, body_timeout
        self.state = state
        state.inflight = 0

    @staticmethod
    async def _refuse(scope, receive, send, e: api.ApiError) -> None:
        await error_response(e)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.inflight += 1
        try:
            await self._gate(scope, receive, send)
        finally:
            self.state.inflight -= 1

    async def _gate(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._refuse(scope, receive, send, api.ApiError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        too_big = api.ApiError(413, f"request body larger than {self.max_body} bytes", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._refuse(scope, receive, send, too_big)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            # One deadline for the whole body, not one per chunk: a client trickling a byte at a time
            # would otherwise hold a connection (and a drain) open for ever.
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except _TooBig:
            return await self._refuse(scope, receive, send, too_big)
        except asyncio.TimeoutError:
            # closed, not kept alive: the rest of a stalled body must never be read as the next request
            return await self._refuse(scope, receive, send, api.ApiError(
                408, f"the request body did not arrive within {self.body_timeout:g} s (the server's "
                     "--body-timeout): send the whole body at once", code="request_timeout",
                headers={"Connection": "close"}))
        if body is None:
            return                              # the client went away
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()      # afterwards: the real stream (http.disconnect when the client goes)

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The body, counted as it comes, so that a chunked upload cannot pass the limit either; None if the
        client disconnected."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooBig
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

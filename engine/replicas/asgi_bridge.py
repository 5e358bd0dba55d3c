"""Drive an ASGI app in this process, one HTTP request at a time, streaming its response messages.

A Ray Serve replica receives a request as a Python object, not a socket; running the server's own
FastAPI app on it keeps every endpoint, error body and stream exactly `engine serve`'s.  When the
consumer stops reading (the client went away, Ray cancelled the call), the app sees
`http.disconnect`, as it would from uvicorn, and aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class InProcessASGI:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._lifespan: asyncio.Task | None = None
        self._lifespan_inbox: asyncio.Queue[Message] = asyncio.Queue()

    async def startup(self) -> None:
        """Run the app's lifespan startup (the engine loop starts there); once per process."""
        if self._lifespan is not None:
            return
        started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        async def send(message: Message) -> None:
            if not started.done():
                started.set_result(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, self._lifespan_inbox.get, send))
        await self._lifespan_inbox.put({"type": "lifespan.startup"})
        message = await started
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {message.get('message', message['type'])}")

    async def shutdown(self) -> None:
        if self._lifespan is not None:
            await self._lifespan_inbox.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(self._lifespan, timeout=30)

    async def request(self, request: HTTPRequest, coalesce_s: float = 0.0) -> AsyncIterator[Message]:
        """The app's response messages: `http.response.start`, then `http.response.body` parts.
        `coalesce_s`: after the first body part, parts arriving within this long of each other
        go out as one (a stream's events batched: each message costs the caller a hop)."""
        outbox: asyncio.Queue[Message | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(_scope(request), receive, outbox.put)
            finally:
                outbox.put_nowait(None)

        task = asyncio.create_task(run())
        first_body = True
        try:
            while (message := await outbox.get()) is not None:
                if message["type"] == "http.response.body" and not first_body and coalesce_s > 0:
                    message = await _coalesced(message, outbox, coalesce_s)
                first_body = first_body and message["type"] != "http.response.body"
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    break
            await task
        finally:
            disconnected.set()  # the app's disconnect watcher ends the request (aborted if unfinished)
            if not task.done():
                await asyncio.wait([task], timeout=5)
                task.cancel()


async def _coalesced(message: Message, outbox: asyncio.Queue, window_s: float) -> Message:
    """`message` with the body parts that follow it within `window_s`, as one part."""
    parts = [message.get("body", b"")]
    more = message.get("more_body", False)
    deadline = asyncio.get_running_loop().time() + window_s
    while more:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        try:
            following = await asyncio.wait_for(outbox.get(), remaining)
        except TimeoutError:
            break
        if following is None:
            outbox.put_nowait(None)  # the app ended: seen by the caller's next get
            break
        parts.append(following.get("body", b""))
        more = following.get("more_body", False)
    return {"type": "http.response.body", "body": b"".join(parts), "more_body": more}


def _scope(request: HTTPRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}

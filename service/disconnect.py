"""A client that hangs up gets no more work done for it: its request is cancelled where it stands.

After the app has read the whole body, a watcher waits on the ASGI channel for `http.disconnect`; if it
comes before the response is done, the request's task is cancelled. Its queued texts are then skipped
by the batcher (counted as `cancelled`) and a teacher call in flight is abandoned, freeing the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics


def cancel_on_disconnect(metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            watcher: asyncio.Task[None] | None = None
            responded = False

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not responded and not handler.done():
                    metrics.client_disconnects.inc()
                    handler.cancel()

            async def receive_body() -> Message:
                nonlocal watcher
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body") and watcher is None:
                    watcher = asyncio.create_task(watch())
                return message

            async def send_tracked(message: Message) -> None:
                nonlocal responded
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    responded = True
                await send(message)

            handler = asyncio.create_task(app(scope, receive_body, send_tracked))
            try:
                await handler
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the server cancelled us: not a hang-up
                    raise
            finally:
                if watcher:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher

        return middleware

    return wrap

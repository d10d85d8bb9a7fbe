"""A client that hangs up gets no more work done for it: its request is cancelled where it stands. One
that stops sending its body is answered 408 once the request deadline has passed, and its connection closed.

A request still unanswered after WATCH_AFTER (waiting on the teacher, or queued far longer than a busy
queue holds it) gets a watcher that waits on the ASGI channel for `http.disconnect`; if it comes before
the answer, the request's task is cancelled. Its queued texts are then skipped by the batcher (counted
as `cancelled`) and a teacher call in flight is abandoned, freeing the budget. Requests answered sooner
pay only a timer: a watcher task per request cost 0.3 ms at one client and 5% of throughput (measured).
WATCH_AFTER sits above a saturated queue's wait (64 clients: p99 130-150 ms on 2 cores): at 50 ms every
request there got a watcher, 880 against 911 texts/s with none (bench/serving.py, one run), to save at
most one text's inference per client that leaves.
A POST answered before its body was read says `Connection: close`, since the server will not reuse it.
The same timer checks that the body arrives within the request deadline: granian bounds the wait for
headers (30 s) but not for a body, so a client stalled mid-body held its request open for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.direct import error_messages
from service.errors import ErrorKind, error_answer
from service.metrics import Metrics

WATCH_AFTER = 0.25


def closing(start: Message) -> Message:
    """A response start that tells the client not to reuse the connection (once, however often asked)."""
    headers = start.get("headers", [])
    if (b"connection", b"close") in headers:
        return start
    return {**start, "headers": [*headers, (b"connection", b"close")]}


def body_timeout_answer(body_timeout_s: float) -> tuple[Message, Message]:
    """The 408 for a body that did not arrive in time, as ASGI messages; the connection is not reused."""
    start, body = error_messages(error_answer(ErrorKind.BODY_TIMEOUT, f"request body not received within "
                                              f"{body_timeout_s:g} s (SENTIMENT_REQUEST_TIMEOUT_S)"))
    return closing(start), body


def cancel_on_disconnect(metrics: Metrics, body_timeout_s: float) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            request = asyncio.current_task()
            loop = asyncio.get_running_loop()
            body_read = started = answered = hung_up = stalled = False
            watcher: asyncio.Task[None] | None = None
            body_deadline = loop.time() + body_timeout_s

            async def watch() -> None:
                nonlocal hung_up
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not answered and request is not None:
                    hung_up = True
                    metrics.client_disconnects.inc()
                    request.cancel()

            def start_watching() -> None:
                nonlocal timer, watcher, stalled
                if answered:
                    return
                if body_read:  # the app has the whole body: the channel's next message is ours to read
                    watcher = loop.create_task(watch())
                elif loop.time() >= body_deadline and not started and request is not None:
                    stalled = True
                    request.cancel()
                else:
                    timer = loop.call_later(WATCH_AFTER, start_watching)

            async def receive_body() -> Message:
                nonlocal body_read
                message = await receive()
                body_read = body_read or (message["type"] == "http.request" and not message.get("more_body"))
                return message

            async def send_tracked(message: Message) -> None:
                nonlocal answered, started
                started = started or message["type"] == "http.response.start"
                if message["type"] == "http.response.start" and not body_read:
                    # Answered before the body was read (413, 401): the server drops the connection with
                    # the unread rest, so the client is told not to reuse it. Without the header a client
                    # sometimes sent its next request into the closing socket (seen as a CI flake).
                    message = closing(message)
                answered = answered or (message["type"] == "http.response.body" and not message.get("more_body"))
                await send(message)

            timer = loop.call_later(WATCH_AFTER, start_watching)
            try:
                await app(scope, receive_body, send_tracked)
            except asyncio.CancelledError:
                if not (hung_up or stalled) or request is None:
                    raise
                request.uncancel()  # nobody is left to answer, or the client is told it took too long
                if stalled:
                    for message in body_timeout_answer(body_timeout_s):
                        await send(message)
            finally:
                timer.cancel()
                if watcher:
                    watcher.cancel()

        return middleware

    return wrap

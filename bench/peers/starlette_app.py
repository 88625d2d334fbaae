"""Peer for bench.py: the same two endpoints with sse-starlette on uvicorn.

Run: python -m uvicorn starlette_app:app --port PORT (uvloop and httptools
come with uvicorn[standard]). Minimal topic pub/sub, as a user would write it.
"""
import asyncio

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

topics: dict[str, set[asyncio.Queue]] = {}


async def events(request):
    topic = request.query_params["topic"]
    queue: asyncio.Queue = asyncio.Queue()
    topics.setdefault(topic, set()).add(queue)

    async def stream():
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            topics[topic].discard(queue)

    return EventSourceResponse(stream(), ping=15)


async def publish(request):
    topic = request.query_params["topic"]
    data = (await request.body()).decode()
    subscribers = topics.get(topic, set())
    for queue in subscribers:
        queue.put_nowait(data)
    return JSONResponse({"subscribers": len(subscribers)})


app = Starlette(routes=[Route("/events", events), Route("/publish", publish, methods=["POST"])])

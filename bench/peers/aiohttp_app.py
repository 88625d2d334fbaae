"""Peer for bench.py: the same two endpoints with aiohttp + aiohttp-sse.

Run: python aiohttp_app.py PORT. Minimal topic pub/sub, as a user would write it.
"""
import asyncio
import sys

from aiohttp import web
from aiohttp_sse import sse_response

topics: dict[str, set[asyncio.Queue]] = {}


async def events(request):
    topic = request.query["topic"]
    queue: asyncio.Queue = asyncio.Queue()
    topics.setdefault(topic, set()).add(queue)
    try:
        async with sse_response(request) as response:
            response.ping_interval = 15
            while response.is_connected():
                await response.send(await queue.get())
    finally:
        topics[topic].discard(queue)
    return response


async def publish(request):
    topic = request.query["topic"]
    data = await request.text()
    subscribers = topics.get(topic, set())
    for queue in subscribers:
        queue.put_nowait(data)
    return web.json_response({"subscribers": len(subscribers)})


app = web.Application()
app.router.add_get("/events", events)
app.router.add_post("/publish", publish)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

"""The pack's web routes on a real aiohttp server on 127.0.0.1, one request per call (unit layer)."""
from __future__ import annotations

import asyncio


def call_route(method: str, path: str) -> tuple[int, dict]:
    """(status, JSON body, or {"text": body} when the answer is not JSON)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from hires_parallel import web_routes

    async def go():
        app = web.Application()
        routes = web.RouteTableDef()
        web_routes.add_routes(routes)
        app.add_routes(routes)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            res = await client.request(method, path)
            is_json = res.content_type == "application/json"
            return res.status, (await res.json()) if is_json else {"text": await res.text()}

    return asyncio.run(go())

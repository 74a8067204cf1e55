"""What the server serves of the browser client: the built page and bundles only."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.anyio


async def test_only_the_build_output_is_served(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    bundle = re.search(r'src="(/static/dist/app\.entry-[A-Za-z0-9]+\.js)"', page.text)
    assert bundle, page.text
    js = await http.get(bundle.group(1))
    assert js.status_code == 200
    # Content-hashed names: a browser may keep them for good.
    assert js.headers["cache-control"] == "public, max-age=31536000, immutable"
    for private in (
        "/static/src/app.entry.js",
        "/static/package.json",
        "/static/build.mjs",
        "/static/node_modules/yjs/package.json",
        "/static/dist/../package.json",
    ):
        r = await http.get(private)
        assert r.status_code == 404, private

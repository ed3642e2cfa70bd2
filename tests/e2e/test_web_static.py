"""The server serves the browser client and the demo page (no browser needed)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest


@pytest.mark.parametrize("path, kind", [
    ("/", "text/html"), ("/turnline.js", "text/javascript"), ("/app.js", "text/javascript"),
    ("/ui.js", "text/javascript"), ("/style.css", "text/css"),
])
def test_the_page_and_the_module_are_served_with_their_types(serve: Any, path: str, kind: str) -> None:
    srv = serve(server_config={"dev": True})
    r = httpx.get(srv.http + path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(kind)  # a module script needs a JavaScript type
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]  # revalidated, never stale


@pytest.mark.parametrize("path", ["/nope.js", "/%2e%2e/server/app.py", "/..%2fserver%2fapp.py", "/web"])
def test_nothing_outside_the_web_folder_is_served(serve: Any, path: str) -> None:
    srv = serve()
    r = httpx.get(srv.http + path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"

"""The web viewer: a page for researchers and operators on the gateway's HTTP port.

    GET  /                  the page (static/index.html; static/app.js, style.css, vendored libraries)
    GET  /static/<file>     its files, shipped in the package (no build step)
    *    /api/...           its JSON API (api.py), on the gRPC servicer's own objects

`mounts(servicer, loop, serving)` gives the routes for service.httpd.OpsServer; the gateway mounts them when
`web` is on (the default). The page holds no data: every model, image and result goes through /api,
which takes the same bearer tokens and allow-lists as the gRPC port.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from xaiserve.service.httpd import Mount


def mounts(servicer: Any, loop: asyncio.AbstractEventLoop, serving: threading.Event | None = None) -> dict[str, Mount]:
    """The viewer's routes for OpsServer(mounts=...): the page, its static files and /api. `serving`
    (set while the gateway serves, cleared when it drains): /api refuses new calls once cleared."""
    from xaiserve.service.web.api import WebApi
    from xaiserve.service.web.site import StaticSite

    site = StaticSite()
    api = WebApi(servicer, loop, serving=serving)
    return {"/": site.index, "/index.html": site.index, "/static/*": site.serve, "/api/*": api.handle}

"""The viewer's static files (static/ in the package), served from memory with ETags.

Only files that ship in static/ are served: the set is read once at start, so a request path is a
dictionary key and never reaches the file system (no traversal). Every answer carries a strict
Content-Security-Policy: scripts, styles and connections from this origin only, no inline script,
images also from data: and blob: URLs (the page draws results into canvases and blobs).
"""

from __future__ import annotations

import hashlib
import mimetypes
from http.server import BaseHTTPRequestHandler
from importlib import resources

STATIC_PREFIX = "/static/"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".mrcs": "application/octet-stream",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


def _content_type(name: str) -> str:
    for ext, ctype in TYPES.items():
        if name.endswith(ext):
            return ctype
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class StaticSite:
    """The files under static/ by URL path ("/static/app.js"), with their type and ETag."""

    def __init__(self) -> None:
        root = resources.files("xaiserve.service.web") / "static"
        self.files: dict[str, tuple[bytes, str, str]] = {}

        def walk(node, prefix: str) -> None:
            for child in node.iterdir():
                if child.is_dir():
                    walk(child, f"{prefix}{child.name}/")
                elif child.is_file() and not child.name.startswith("."):
                    data = child.read_bytes()
                    etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
                    self.files[f"{STATIC_PREFIX}{prefix}{child.name}"] = (data, _content_type(child.name), etag)

        walk(root, "")
        if f"{STATIC_PREFIX}index.html" not in self.files:
            raise RuntimeError("the web viewer's static/index.html is missing from the package")

    def index(self, h: BaseHTTPRequestHandler) -> None:
        self._send(h, f"{STATIC_PREFIX}index.html")

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        self._send(h, h.path.split("?", 1)[0])

    def _send(self, h: BaseHTTPRequestHandler, key: str) -> None:
        if h.command not in ("GET", "HEAD"):
            h.send_response(405)
            h.send_header("Allow", "GET, HEAD")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        item = self.files.get(key)
        if item is None:
            body = b"not found: the viewer has no such file\n"
            h.send_response(404)
            h.send_header("Content-Type", "text/plain; charset=utf-8")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        data, ctype, etag = item
        fresh = h.headers.get("If-None-Match") == etag
        h.send_response(304 if fresh else 200)
        h.send_header("ETag", etag)
        # revalidated on every load (a 304 costs a round trip): a new release is picked up at once
        h.send_header("Cache-Control", "no-cache")
        for k, v in SECURITY_HEADERS.items():
            h.send_header(k, v)
        if fresh:
            h.end_headers()
            return
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

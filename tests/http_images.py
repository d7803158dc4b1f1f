"""A real HTTP server on 127.0.0.1 with one image and every way an image URL can go wrong.

It records every request it sees, so that tests can prove a refused URL sent nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import encode, photo

JPEG = encode(photo(64, 48), "JPEG", quality=90)


class _Handler(BaseHTTPRequestHandler):
    seen: list[tuple[str, dict]] = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, dict(self.headers)))
        route = self.path.split("?")[0]
        if route == "/cat.jpg":
            self._send(200, "image/jpeg", JPEG)
        elif route == "/missing.jpg":
            self._send(404, "text/plain", b"not here")
        elif route == "/slow.jpg":
            time.sleep(3)
            self._send(200, "image/jpeg", JPEG)
        elif route == "/trickle.jpg":  # answers at once, then one byte at a time, never finishing in time
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for byte in JPEG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        elif route == "/endless.jpg":  # no Content-Length, a body that never ends
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        elif route == "/page.html":
            self._send(200, "text/html", b"<html>hello</html>")
        elif route.startswith("/redirect/"):  # /redirect/<target path or URL, url-quoted>
            from urllib.parse import unquote

            self.send_response(302)
            self.send_header("Location", unquote(route[len("/redirect/"):]))
            self.end_headers()
        elif route == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self._send(404, "text/plain", b"?")

    def _send(self, status, kind, body):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients that hang up on purpose are expected
        pass


@contextlib.contextmanager
def serve_images():
    """Yield (base URL, list of (path, headers) the server has seen)."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.seen
    finally:
        httpd.shutdown()

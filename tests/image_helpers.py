"""Images for the image-row tests: small PNGs, data: URLs, and a local HTTP server whose
paths each stand for one way a fetch ends."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def png(width: int = 50, height: int = 40, color=(255, 0, 0)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_chat(*urls: str, text: str = "what is in the picture?", **body) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **body}


class ImageServer:
    """127.0.0.1 HTTP server: /red.png, /blue.jpg (images), /big.png (`big` bytes),
    /text.png (no image), /missing (404), /slow.png (answers after `slow` seconds)."""

    def __init__(self, big: int = 4096, slow: float = 5.0):
        from PIL import Image

        jpeg = io.BytesIO()
        Image.new("RGB", (30, 30), (0, 0, 255)).save(jpeg, "JPEG")
        self.files = {
            "/red.png": png(),
            "/blue.jpg": jpeg.getvalue(),
            "/big.png": b"\x89PNG" + b"\0" * big,
            "/text.png": b"this is not an image",
            "/slow.png": png(),
        }
        self.slow = slow
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                if self.path.startswith("/slow"):
                    time.sleep(server.slow)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "ImageServer":
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

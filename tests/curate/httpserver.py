"""A loopback HTTP image server for download tests and benchmarks, and the hostile images.

`ImageServer` is a threaded `http.server` on 127.0.0.1 with an ephemeral port (HTTPS when
given a TLS context). Routes map a path to a `Route`: fixed bytes with a content type, an HTTP
error, a redirect, a stall, a slow trickle (of the body or of the headers), a reset
connection, or a flaky route that fails its first N hits. `gen/<i>.<ext>` paths serve
generated images for benchmarks. Every hit, User-Agent and Host header is recorded for
assertions. `silent_url` is a port that accepts connections and never answers.
"""
from __future__ import annotations

import contextlib
import io
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import numpy as np
from PIL import Image


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "image/jpeg"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0  # seconds to sleep before answering
    trickle: float = 0.0  # seconds between single body bytes (no Content-Length)
    reset: bool = False  # close the connection without an answer
    fail_first: int = 0  # answer `fail_status` to the first N hits, then normally
    fail_status: int = 503
    chunked: bool = False  # send the body without Content-Length
    location: str | None = None  # redirect: answer `status` (302 when left at 200) with this Location
    header_trickle: float = 0.0  # seconds between single bytes of the status line and headers


class ImageServer:
    def __init__(self, gen_images: list[bytes] | None = None, tls: ssl.SSLContext | None = None):
        self.routes: dict[str, Route] = {}
        self.gen_images = gen_images or []
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self.hosts: list[str] = []  # the Host header of every request
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True  # a stalled handler never blocks shutdown
        self.scheme = "https" if tls else "http"
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path.lstrip("/")] = route
        return self.url(path)

    def record(self, path: str, ua: str, host: str) -> int:
        with self._lock:
            self.hits[path] += 1
            self.user_agents.append(ua)
            self.hosts.append(host)
            return self.hits[path]

    def sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.lstrip("/")
            hit = server.record(path, self.headers.get("User-Agent", ""), self.headers.get("Host", ""))
            route = server.routes.get(path) or _generated(server, path)
            if route is None:
                return self.send_error(404, "Not Found")
            _serve(self, server, route, hit)

    return Handler


def _generated(server: ImageServer, path: str) -> Route | None:
    if not path.startswith("gen/") or not server.gen_images:
        return None
    i = int(path[4:].split(".")[0])
    return Route(server.gen_images[i % len(server.gen_images)])


def _serve(h: BaseHTTPRequestHandler, server: ImageServer, route: Route, hit: int) -> None:
    if route.reset:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.close_connection = True
        return
    if route.stall:
        server.sleep(route.stall)
    if hit <= route.fail_first:
        return h.send_error(route.fail_status)
    if route.location is not None:
        return _redirect(h, route)
    if route.status != 200:
        return h.send_error(route.status)
    try:
        _headers(h, server, route)
        if route.trickle:
            for b in route.body:
                if server.stopping.is_set():
                    return
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                server.sleep(route.trickle)
        else:
            h.wfile.write(route.body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up, as it should


def _headers(h: BaseHTTPRequestHandler, server: ImageServer, route: Route) -> None:
    fields = {"Content-Type": route.content_type, **route.headers}
    if not (route.trickle or route.chunked):
        fields["Content-Length"] = str(len(route.body))
    if not route.header_trickle:
        h.send_response(200)
        for k, v in fields.items():
            h.send_header(k, v)
        return h.end_headers()
    head = "HTTP/1.0 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    for b in head.encode():
        if server.stopping.is_set():
            return
        h.wfile.write(bytes([b]))
        h.wfile.flush()
        server.sleep(route.header_trickle)


def _redirect(h: BaseHTTPRequestHandler, route: Route) -> None:
    h.send_response(302 if route.status == 200 else route.status)
    h.send_header("Location", route.location)
    h.send_header("Content-Length", "0")
    h.end_headers()


@contextlib.contextmanager
def silent_url(scheme: str = "http") -> Iterator[str]:
    """A URL on a port whose TCP connections complete (the kernel's backlog) but that nobody
    ever reads from or answers: a server that accepts and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"{scheme}://127.0.0.1:{s.getsockname()[1]}/never.jpg"


def closed_port_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing.jpg"


# ---------------------------------------------------------------- images, good and hostile


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (compresses like a photo, distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def jpeg(w: int = 96, h: int = 64, seed: int = 0) -> bytes:
    return _save(photo(w, h, seed), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = jpeg(128, 96, seed=1)
    return data[: len(data) // 3]


def cmyk_jpeg() -> bytes:
    return _save(photo(80, 60, seed=2).convert("CMYK"), "JPEG")


def png16() -> bytes:
    """16-bit greyscale PNG with a full-range ramp (OpenCV alone saturates it to white)."""
    ramp = np.linspace(0, 65535, 64 * 96).reshape(64, 96).astype(np.uint16)
    return _save(Image.fromarray(ramp), "PNG")


def palette_png_transparent() -> bytes:
    return _save(photo(70, 50, seed=3).convert("P"), "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [photo(60, 40, seed=s).convert("P") for s in (4, 5, 6)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 120x60 (landscape) with EXIF orientation 6: displays as 60x120 (portrait)."""
    im = photo(120, 60, seed=7)
    exif = im.getexif()
    exif[0x0112] = 6
    return _save(im, "JPEG", exif=exif)


def thin_png(w: int = 1, h: int = 20000) -> bytes:
    return _save(Image.new("L", (w, h), 128), "PNG")


def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of w x h zeros, written row by row (never held in memory):
    ~100 KB on the wire, w*h pixels (900 M by default) once decoded."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = 256  # rows per compress call: ~1 MB at a time
    parts = [comp.compress(row * min(block, h - y)) for y in range(0, h, block)]
    idat = b"".join(parts) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


HTML_PAGE = b"<!doctype html><html><head><title>Image not found</title></head><body>gone</body></html>"


# ---------------------------------------------------------------- TLS for an HTTPS ImageServer


def tls_pair(names: list[str], folder: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context): a fresh CA, and a certificate for DNS `names` signed by
    it; the client context trusts only that CA and verifies host names as urllib's default does."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, sans: list[str]) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("tessera test CA", ca_key, "tessera test CA", ca_key, True, [])
    leaf = cert(names[0], leaf_key, "tessera test CA", ca_key, False, names)
    pem = serialization.Encoding.PEM
    chain, key_file = f"{folder}/leaf.pem", f"{folder}/leaf.key"
    with open(chain, "wb") as f:
        f.write(leaf.public_bytes(pem) + ca.public_bytes(pem))
    with open(key_file, "wb") as f:
        f.write(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client

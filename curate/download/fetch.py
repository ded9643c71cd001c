"""The HTTP GET of a download: img2dataset's request, behind the network guard, under one deadline.

img2dataset fetches with `urllib.request.urlopen`, which opens `file:` and `ftp:` URLs, connects
to whatever a name resolves to (127.0.0.1, 10.x, the cloud metadata endpoint), follows
redirects into them, goes through any proxy named in the environment, and bounds each socket
call but not the request. `Client.get` sends the same request (GET, img2dataset's User-Agent
with our token, `Connection: close`, the X-Robots-Tag opt-out honoured) but, for each hop:

  1. the URL must be http or https with a host (`parse_url`; else `bad_url`);
  2. the host is resolved once (`curate.download.deadline.resolve`, within the deadline) and
     each address it resolves to is checked by the `AddressPolicy`; refused ones are dropped,
     and a URL left with none fails `blocked_address`;
  3. the TCP connection goes to exactly a checked address (no second lookup, so no DNS
     rebinding); the Host header and TLS SNI carry the name, and the certificate is verified
     against it with the default context, as urllib does;
  4. a redirect (301/302/303/307/308) starts the next hop at step 1, at most MAX_REDIRECTS times;
  5. the body is read under the byte cap.
Every blocking call gets the stall timeout or the time left, whichever is less, and the
deadline's alarm shuts the connection down when the URL's time is up (`curate.download.deadline`).

Proxies from the environment (`http_proxy`, `https_proxy`, `all_proxy`) are ignored: through a
proxy the guard could not see, or choose, the address that is finally reached.
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote, urljoin, urlsplit

from curate.download.addresses import AddressPolicy
from curate.download.deadline import Cut, Deadline, Resolver, cut_at, resolve
from curate.download.limits import LimitError, Limits

# The User-Agent img2dataset sends, with its "compatible" suffix naming our token.
_UA_BASE = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_CHUNK = 1 << 16  # bytes per read1(): small enough to check the deadline often
SCHEMES = {"http": 80, "https": 443}  # the only schemes fetched, with their default ports
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10  # as urllib: an 11th redirect fails the URL (too_many_redirects)
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # http.client refuses these in a request line
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


class HTTPError(Exception):
    """A non-2xx answer; the message is urllib's (`HTTP Error 404: Not Found`), so
    `curate.download.errors.classify` reads it the same."""


@dataclass(frozen=True)
class Target:
    """One hop's request: where to connect and what to ask for."""

    scheme: str  # http | https
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    path: str  # the request target: path and query, non-ASCII percent-encoded


def user_agent(token: str | None) -> str:
    if not token:
        return _UA_BASE
    return f"{_UA_BASE} (compatible; {token}; +https://github.com/rom1504/img2dataset)"


def parse_url(url: object) -> Target:
    """`url` as a request Target; LimitError `bad_url: ...` for anything but an http(s) URL
    with a host (file:, ftp:, data:, no host, a bad port, spaces or control characters)."""
    if not isinstance(url, str) or not url.strip():
        raise LimitError(f"bad_url: {url!r}")
    if _UNSAFE.search(url):
        raise LimitError("bad_url: space or control character in the URL")
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise LimitError(f"bad_url: scheme {scheme!r} is not fetched (only http and https)")
        if not parts.hostname:
            raise LimitError("bad_url: no host")
        port = parts.port or SCHEMES[scheme]
        host = parts.hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:  # a bad port or IPv6 literal, an invalid IDN label
        raise LimitError(f"bad_url: {exc}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, _NON_ASCII.sub(lambda m: quote(m.group()), path))


def read_capped(stream, max_bytes: int, deadline: Deadline) -> bytes:
    """Read `stream` to its end, refusing more than `max_bytes` or past `deadline`."""
    buf = bytearray()
    while True:
        deadline.check("body")
        # read1: return whatever arrived (read() would block until the whole chunk is in,
        # so a server trickling one byte per second could hold us for hours).
        chunk = stream.read1(min(_CHUNK, max_bytes + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise LimitError(f"too_large:bytes>{max_bytes}")


@functools.lru_cache(maxsize=1)
def default_tls() -> ssl.SSLContext:
    """urllib's HTTPS context: system CAs, certificate and host name verified, ALPN http/1.1."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _HTTPS(http.client.HTTPConnection):
    """A connection over an already-wrapped TLS socket (only the Host header's default port differs)."""

    default_port = 443


@dataclass(frozen=True)
class Client:
    """What a fetch needs besides the URL; one per img2dataset call of a worker."""

    timeout: float  # seconds one blocking call may stall (connect, TLS, a read)
    token: str | None  # our User-Agent token
    limits: Limits  # byte cap and max_seconds (the URL's deadline)
    policy: AddressPolicy  # which addresses may be connected to
    robots: Callable[[http.client.HTTPMessage], bool] | None = None  # True: X-Robots-Tag opts out
    resolver: Resolver = socket.getaddrinfo  # a test may answer for DNS
    tls: ssl.SSLContext | None = None  # None: default_tls()

    def get(self, url: str, deadline: Deadline) -> bytes:
        """The body at `url`, following redirects; raises LimitError (a refusal, the ledger
        reason), HTTPError, TimeoutError or the network's own errors."""
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_url(url)
            with self._exchange(target, deadline) as (response, cut):
                location = redirect_location(response)
                if location is None:
                    return self._body(response, cut, deadline)
            url = urljoin(url, location)
        raise LimitError(f"too_many_redirects: more than {MAX_REDIRECTS}")

    @contextlib.contextmanager
    def _exchange(self, target: Target, deadline: Deadline) -> Iterator[tuple[http.client.HTTPResponse, Cut]]:
        """Connect to the checked address, send the request, yield the response (headers read)."""
        conn = (_HTTPS if target.scheme == "https" else http.client.HTTPConnection)(target.host, target.port)
        sock = self._connect(self.addresses(target, deadline), deadline)
        try:
            with cut_at(deadline, sock) as cut:
                try:
                    conn.sock = self._tls(sock, target, deadline) if target.scheme == "https" else sock
                    conn.sock.settimeout(deadline.budget(self.timeout, "request"))
                    conn.request("GET", target.path, headers={"User-Agent": user_agent(self.token),
                                                              "Connection": "close"})
                    yield conn.getresponse(), cut
                except Exception as exc:
                    if cut.fired:  # whatever the cut connection raised, the cause is the deadline
                        raise deadline.timeout(f"request to {target.host}") from exc
                    raise
        finally:
            sock.close()
            conn.close()

    def addresses(self, target: Target, deadline: Deadline) -> list[tuple[int, tuple]]:
        """(family, sockaddr) of the addresses `target.host` resolves to (looked up once) that
        the policy allows, in the resolver's order; LimitError `blocked_address` when none is."""
        try:
            ip = ipaddress.ip_address(target.host)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            answers = [(family, (target.host, target.port))]
        except ValueError:  # a name (also `127.1`, `0x7f000001`: the resolver reads those)
            answers = [(a[0], a[4]) for a in resolve(target.host, target.port, deadline, self.resolver)
                       if a[0] in (socket.AF_INET, socket.AF_INET6)]
        if not answers:
            raise socket.gaierror(socket.EAI_NODATA, f"No address associated with hostname {target.host}")
        allowed, refused = [], []
        for answer in dict.fromkeys(answers):
            ip = ipaddress.ip_address(answer[1][0])
            why = self.policy.refusal(ip)
            if why:
                refused.append(f"{ip} ({why})")
            else:
                allowed.append(answer)
        if not allowed:
            name = "" if target.host == answers[0][1][0] else f"{target.host} -> "
            raise LimitError(f"blocked_address: {name}{', '.join(refused)}")
        return allowed

    def _connect(self, answers: list[tuple[int, tuple]], deadline: Deadline) -> socket.socket:
        """A TCP connection to the first of `answers` that accepts (as socket.create_connection)."""
        error: OSError | None = None
        for family, sockaddr in answers:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(deadline.budget(self.timeout, "connect"))
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error  # type: ignore[misc]  (answers is never empty)

    def _tls(self, sock: socket.socket, target: Target, deadline: Deadline) -> ssl.SSLSocket:
        sock.settimeout(deadline.budget(self.timeout, "TLS handshake"))
        return (self.tls or default_tls()).wrap_socket(sock, server_hostname=target.host)

    def _body(self, response: http.client.HTTPResponse, cut: Cut, deadline: Deadline) -> bytes:
        if self.robots and self.robots(response.headers):
            raise LimitError("Use of image disallowed by X-Robots-Tag directive")
        length = response.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > self.limits.max_bytes:
            raise LimitError(f"too_large:bytes>{self.limits.max_bytes}")
        data = read_capped(response, self.limits.max_bytes, deadline)
        if cut.fired:  # the alarm ended the body early: these bytes are not the image
            raise deadline.timeout("body")
        return data


def redirect_location(response: http.client.HTTPResponse) -> str | None:
    """Where a redirect points, None for a 2xx answer; HTTPError for any other status."""
    status = response.status
    if 200 <= status < 300:
        return None
    location = response.headers.get("Location")
    if status in REDIRECTS and location:
        return location
    raise HTTPError(f"HTTP Error {status}: {response.reason}")

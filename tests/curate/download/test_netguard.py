"""The network guard and the per-URL deadline of curate download's fetch (no img2dataset call).

Every fetch here runs against loopback servers with 127.0.0.0/8 allowed explicitly, as the
tests and the demo must; the other ranges are reached through redirects and an injected
resolver, never by connecting (nothing outside loopback is ever dialled).
"""
from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import httpserver as hs  # noqa: E402

from curate.download.addresses import AddressPolicy, blocked_range, embedded_ipv4  # noqa: E402
from curate.download.deadline import Alarm, Deadline, resolve  # noqa: E402
from curate.download.engine import download_with_retry  # noqa: E402
from curate.download.errors import classify  # noqa: E402
from curate.download.fetch import MAX_REDIRECTS, Client, Target, parse_url  # noqa: E402
from curate.download.limits import LimitError, Limits  # noqa: E402

LIMITS = Limits(max_bytes=100_000, max_pixels=1_000_000, max_aspect_ratio=10.0, max_seconds=2.0)
LOOPBACK = AddressPolicy.from_cidrs(["127.0.0.0/8"])
DEADLINE = 1.0  # seconds, in the hostile-timing cases
MARGIN = 0.6  # seconds a timed-out fetch may overrun its deadline (thread wake-ups on a busy 2-core box)


def reason(exc: BaseException) -> str:
    return classify("failed_to_download", str(exc))


# ---------------------------------------------------------------- the address policy (pure)

REFUSED = [
    # IPv4: loopback, private, link-local, CGNAT, unspecified, multicast, broadcast, reserved, benchmark, docs
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("10.0.0.1", "private"),
    ("10.255.255.255", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"), ("169.254.1.1", "link_local"), ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"), ("192.0.0.8", "reserved"), ("198.18.0.1", "benchmark"),
    ("198.19.255.255", "benchmark"), ("192.0.2.1", "documentation"), ("203.0.113.9", "documentation"),
    # cloud metadata endpoints
    ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("100.100.100.200", "metadata"),
    ("192.0.0.192", "metadata"), ("fd00:ec2::254", "metadata"), ("fd20:ce::254", "metadata"),
    # IPv6
    ("::", "unspecified"), ("::1", "loopback"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("fe80::1", "link_local"), ("fec0::1", "site_local"), ("ff02::1", "multicast"), ("100::1", "reserved"),
    ("2001::1", "reserved"), ("2001:db8::1", "documentation"), ("2001:2::1", "benchmark"),
    ("64:ff9b:1::1", "private"), ("4000::1", "reserved"),
    # IPv6 forms that carry an IPv4 address: judged by the IPv4 one
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0:10.0.0.1", "private"), ("::10.0.0.1", "private"), ("::0.0.0.2", "unspecified"),
    ("64:ff9b::10.0.0.1", "private"), ("64:ff9b::169.254.169.254", "metadata"),
    ("2002:a00:1::1", "private"), ("2002:a9fe:a9fe::", "metadata"), ("::ffff:100.100.100.200", "metadata"),
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "93.184.216.34", "2606:4700:4700::1111",
          "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("address,why", REFUSED)
def test_refused_by_default(address, why):
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address,allow,why", [
    ("127.0.0.1", ["127.0.0.0/8"], None),
    ("::ffff:127.0.0.1", ["127.0.0.0/8"], None),  # the mapped form of an allowed address
    ("::1", ["127.0.0.0/8"], "loopback"),  # IPv6 loopback is another network
    ("10.0.0.1", ["127.0.0.0/8"], "private"),
    ("10.1.2.3", ["0.0.0.0/0"], None),  # everything IPv4, explicitly...
    ("169.254.1.1", ["169.254.0.0/16"], None),
    ("169.254.169.254", ["169.254.0.0/16"], "metadata"),  # ...but not a metadata endpoint
    ("100.100.100.200", ["100.64.0.0/10"], "metadata"),
    ("fd00:ec2::254", ["::/0", "0.0.0.0/0"], "metadata"),
    ("169.254.169.254", ["169.254.169.254/32"], None),  # unless named by itself
])
def test_allow_networks(address, allow, why):
    assert AddressPolicy.from_cidrs(allow).refusal(ipaddress.ip_address(address)) == why


def test_policy_agrees_with_ipaddress_on_random_addresses():
    """Everything Python's ipaddress calls non-global (or multicast) is refused; what passes is global."""
    rng = random.Random(0)
    samples = [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(20000)]
    samples += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(5000)]
    samples += [ipaddress.IPv6Address((1 << 125) | rng.getrandbits(125)) for _ in range(5000)]  # 2000::/3
    policy = AddressPolicy()
    for ip in samples:
        why = policy.refusal(ip)
        target = embedded_ipv4(ip) or ip
        if not target.is_global or target.is_multicast:
            assert why is not None, ip
        if why is None:
            assert target.is_global and not target.is_multicast, ip
    assert blocked_range(ipaddress.ip_address("8.8.8.8")) is None


# ---------------------------------------------------------------- URLs: http and https only


@pytest.mark.parametrize("url", [
    "file:///etc/hostname", "ftp://example.com/a.jpg", "data:image/png;base64,iVBORw0KGgo=",
    "gopher://example.com/1", "javascript:alert(1)", "//example.com/a.jpg", "a.jpg", "http://",
    "http:///a.jpg", "http://a b.com/x.jpg", "http://example.com/a b.jpg", "http://exa\nmple.com/",
    "http://example.com:99999/", "http://example.com:port/", "http://[::1/", None, "", "  ",
])
def test_only_http_and_https_urls_are_fetched(url):
    with pytest.raises(LimitError, match="^bad_url:") as exc:
        parse_url(url)
    assert reason(exc.value) == "bad_url"


def test_parse_url_targets():
    assert parse_url("HTTP://Example.COM/a/b.jpg?x=1&y=2#frag") == Target("http", "example.com", 80, "/a/b.jpg?x=1&y=2")
    assert parse_url("https://bücher.de/ä.jpg") == Target("https", "xn--bcher-kva.de", 443, "/%C3%A4.jpg")
    assert parse_url("http://[::1]:8080") == Target("http", "::1", 8080, "/")
    assert parse_url("https://user:pw@1.2.3.4:444/x") == Target("https", "1.2.3.4", 444, "/x")


def test_file_urls_are_not_read(tmp_path):
    """urllib (img2dataset's fetch) returns a local file's bytes; ours refuses the URL."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not crawl me")
    with urllib.request.build_opener().open(secret.as_uri()) as r:
        assert r.read() == b"do not crawl me"  # what the guard prevents
    for url in (secret.as_uri(), "file:///etc/hostname"):
        _, stream, err = download_with_retry((0, url), 5, 2, "tessera", None, LIMITS, LOOPBACK)
        assert stream is None and classify("failed_to_download", err) == "bad_url"


# ---------------------------------------------------------------- redirects, hop by hop


@pytest.fixture(scope="module")
def server():
    with hs.ImageServer() as s:
        yield s


@pytest.mark.parametrize("location,why", [
    ("http://10.0.0.1/x.jpg", "blocked_address"), ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
    ("http://[::ffff:10.0.0.1]:80/x.jpg", "blocked_address"), ("http://[::1]/x.jpg", "blocked_address"),
    ("http://100.100.100.200/", "blocked_address"), ("file:///etc/hostname", "bad_url"),
    ("ftp://127.0.0.1/x.jpg", "bad_url"),
])
def test_a_redirect_out_of_the_allowed_network_is_refused(server, location, why):
    """127.0.0.0/8 is allowed, so the first hop is fetched; the hop it redirects to is not."""
    name = f"to-{abs(hash(location))}.jpg"
    url = server.add(name, hs.Route(location=location))
    t0 = time.perf_counter()
    with pytest.raises(LimitError) as exc:
        Client(5, "tessera", LIMITS, LOOPBACK).get(url, Deadline(2))
    assert reason(exc.value) == why and server.hits[name] == 1
    assert time.perf_counter() - t0 < 0.5  # refused before any connection was tried


def test_redirects_are_followed_within_the_allowed_network_up_to_the_limit(server):
    image = hs.jpeg(seed=21)
    server.add("final.jpg", hs.Route(image))
    server.add("hop2.jpg", hs.Route(location=server.url("final.jpg"), status=308))
    server.add("hop1.jpg", hs.Route(location="/hop2.jpg", status=301))  # relative Location
    client = Client(5, "tessera", LIMITS, LOOPBACK)
    assert client.get(server.url("hop1.jpg"), Deadline(2)) == image
    assert all(server.hits[p] == 1 for p in ("hop1.jpg", "hop2.jpg", "final.jpg"))
    server.add("loop.jpg", hs.Route(location="/loop.jpg", status=307))
    with pytest.raises(LimitError, match="^too_many_redirects") as exc:
        client.get(server.url("loop.jpg"), Deadline(5))
    assert reason(exc.value) == "too_many_redirects" and server.hits["loop.jpg"] == MAX_REDIRECTS + 1


# ---------------------------------------------------------------- DNS: resolved once, connected as checked


class Answers:
    """A resolver (getaddrinfo's signature) answering from a list, one answer per call."""

    def __init__(self, *answers: list[str]):
        self.answers, self.calls = list(answers), []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.calls.append(host)
        addrs = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addrs]


@pytest.fixture
def no_system_dns(monkeypatch):
    """Any lookup other than the injected resolver's fails the test (e.g. a second one by http.client)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"system resolver called: {args}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_dns_rebinding_cannot_move_the_connection(server, no_system_dns):
    """The name is looked up once per hop and the connection goes to the address that was
    checked; a resolver that answers differently the second time is never asked again."""
    image = hs.jpeg(seed=22)
    server.add("rebind.jpg", hs.Route(image))
    rebinding = Answers(["127.0.0.1"], ["10.0.0.1"])
    client = Client(5, "tessera", LIMITS, LOOPBACK, resolver=rebinding)
    url = f"http://rebind.test:{server.port}/rebind.jpg"
    assert client.get(url, Deadline(2)) == image
    assert rebinding.calls == ["rebind.test"] and server.hosts[-1] == f"rebind.test:{server.port}"
    hits = server.hits["rebind.jpg"]
    inverse = Answers(["10.0.0.1"], ["127.0.0.1"])  # refused first: not asked again, nothing sent
    with pytest.raises(LimitError, match=r"^blocked_address: rebind.test -> 10.0.0.1 \(private\)"):
        Client(5, "tessera", LIMITS, LOOPBACK, resolver=inverse).get(url, Deadline(2))
    assert inverse.calls == ["rebind.test"] and server.hits["rebind.jpg"] == hits
    mixed = Answers(["169.254.169.254", "::1", "127.0.0.1"])  # only the allowed address is dialled
    assert Client(5, "tessera", LIMITS, LOOPBACK, resolver=mixed).get(url, Deadline(2)) == image


def test_each_redirect_hop_is_resolved_and_checked(server, no_system_dns):
    server.add("to-name.jpg", hs.Route(location=f"http://inside.test:{server.port}/final.jpg"))
    server.add("final.jpg", hs.Route(hs.jpeg(seed=21)))
    resolver = Answers(["127.0.0.1"], ["192.168.0.10"])  # first.test, then inside.test
    client = Client(5, "tessera", LIMITS, LOOPBACK, resolver=resolver)
    with pytest.raises(LimitError, match=r"inside.test -> 192.168.0.10 \(private\)"):
        client.get(f"http://first.test:{server.port}/to-name.jpg", Deadline(2))
    assert resolver.calls == ["first.test", "inside.test"]


# ---------------------------------------------------------------- TLS: the name is verified, not the address


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    server_ctx, client_ctx = hs.tls_pair(["images.test"], str(tmp_path_factory.mktemp("tls")))
    with hs.ImageServer(tls=server_ctx) as s:
        s.add("ok.jpg", hs.Route(hs.jpeg(seed=23)))
        yield s, client_ctx


def test_tls_connects_to_the_checked_address_and_verifies_the_name(tls_server, no_system_dns):
    server, trust = tls_server
    resolver = Answers(["127.0.0.1"])
    client = Client(5, "tessera", LIMITS, LOOPBACK, resolver=resolver, tls=trust)
    assert client.get(server.url("ok.jpg", "images.test"), Deadline(2)) == hs.jpeg(seed=23)
    assert server.hosts[-1] == f"images.test:{server.port}"
    for url, tls in ((server.url("ok.jpg", "other.test"), trust),  # a certificate for another name
                     (server.url("ok.jpg"), trust),  # the address itself is not in the certificate
                     (server.url("ok.jpg", "images.test"), None)):  # the system CAs do not know ours
        with pytest.raises(OSError) as exc:
            Client(5, "tessera", LIMITS, LOOPBACK, resolver=resolver, tls=tls).get(url, Deadline(2))
        assert reason(exc.value) == "tls", exc.value


# ---------------------------------------------------------------- proxies cannot bypass the guard


def test_environment_proxies_are_not_used(server, monkeypatch):
    with hs.ImageServer() as proxy:
        for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url(""))
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with pytest.raises(urllib.error.HTTPError):  # urllib (img2dataset's fetch) asks the proxy
            urllib.request.build_opener().open(server.url("final.jpg"), timeout=5)
        assert sum(proxy.hits.values()) == 1
        server.add("final.jpg", hs.Route(hs.jpeg(seed=21)))
        assert Client(5, "tessera", LIMITS, LOOPBACK).get(server.url("final.jpg"), Deadline(2)) == hs.jpeg(seed=21)
        with pytest.raises(LimitError, match="blocked_address"):
            Client(5, "tessera", LIMITS, LOOPBACK).get("http://10.0.0.1/x.jpg", Deadline(2))
        assert sum(proxy.hits.values()) == 1  # ours never did


# ---------------------------------------------------------------- one deadline per URL


class SlowDNS:
    def __init__(self):
        self.release = threading.Event()

    def __call__(self, host, port, **kwargs):
        self.release.wait(30)
        return Answers(["127.0.0.1"])(host, port)


def test_no_server_outlives_the_deadline(server, tls_server):
    """Each hostile case alone would hold a fetch for many seconds, or forever, with a 10 s
    stall timeout: the URL's 1 s deadline ends every one of them (run concurrently, so the
    alarm thread serves several deadlines at once)."""
    tls, trust = tls_server
    server.add("trickle-headers.jpg", hs.Route(hs.jpeg(), header_trickle=0.1))  # ~65 bytes: ~7 s
    server.add("trickle-body.jpg", hs.Route(hs.jpeg(), trickle=0.05))
    server.add("stall.jpg", hs.Route(hs.jpeg(), stall=30))
    for i in range(6):  # 6 hops of 0.3 s each, every one well under the stall timeout
        server.add(f"slow-hop{i}.jpg", hs.Route(location=f"/slow-hop{i + 1}.jpg", stall=0.3))
    server.add("slow-hop6.jpg", hs.Route(hs.jpeg()))
    tls.add("trickle-headers.jpg", hs.Route(hs.jpeg(), header_trickle=0.1))
    dns = SlowDNS()
    with hs.silent_url() as silent, hs.silent_url("https") as silent_tls:
        cases = {
            "headers trickled": (server.url("trickle-headers.jpg"), None),
            "body trickled": (server.url("trickle-body.jpg"), None),
            "accepted, never answered": (silent, None),
            "TLS handshake never answered": (silent_tls, None),
            "headers trickled over TLS": (tls.url("trickle-headers.jpg", "images.test"), Answers(["127.0.0.1"])),
            "request read, never answered": (server.url("stall.jpg"), None),
            "redirect chain of slow hops": (server.url("slow-hop0.jpg"), None),
            "slow DNS": (f"http://slow.test:{server.port}/stall.jpg", dns),
        }

        def run(case):
            url, resolver = cases[case]
            client = Client(10, "tessera", LIMITS, LOOPBACK, resolver=resolver or socket.getaddrinfo, tls=trust)
            t0 = time.perf_counter()
            try:
                client.get(url, Deadline(DEADLINE))
                return case, "fetched", time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001
                return case, reason(exc), time.perf_counter() - t0

        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(run, cases))
        dns.release.set()
    for case, why, seconds in results:
        assert why == "timeout" and seconds < DEADLINE + MARGIN, (case, why, seconds)
    assert server.hits["slow-hop6.jpg"] == 0


def test_the_deadline_covers_the_retries_too(server):
    """A stall timeout of 0.4 s and 5 retries, under a 1 s deadline: three attempts, then timeout."""
    server.add("stall-retry.jpg", hs.Route(hs.jpeg(), stall=30))
    limits = Limits(max_bytes=100_000, max_pixels=1_000_000, max_aspect_ratio=10.0, max_seconds=DEADLINE)
    t0 = time.perf_counter()
    _, stream, err = download_with_retry((0, server.url("stall-retry.jpg")), 0.4, 5, "tessera", None, limits, LOOPBACK)
    assert stream is None and classify("failed_to_download", err) == "timeout"
    assert time.perf_counter() - t0 < DEADLINE + MARGIN and server.hits["stall-retry.jpg"] == 3


def test_a_stuck_lookup_does_not_delay_the_next(no_system_dns):
    stuck = SlowDNS()
    with pytest.raises(TimeoutError, match="DNS lookup of stuck.test"):
        resolve("stuck.test", 80, Deadline(0.2), stuck)
    t0 = time.perf_counter()  # the stuck thread is still in the resolver: another one answers
    assert resolve("fast.test", 80, Deadline(2), Answers(["127.0.0.1"]))[0][4] == ("127.0.0.1", 80)
    assert time.perf_counter() - t0 < 0.5
    stuck.release.set()


def test_alarm_fires_armed_timers_only():
    alarm, fired = Alarm(), []
    now = time.monotonic()
    alarm.arm(now + 0.05, lambda: fired.append("kept"))
    alarm.cancel(alarm.arm(now + 0.05, lambda: fired.append("cancelled")))
    for _ in range(3000):  # many cancelled far-future timers (one per finished fetch) are compacted away
        alarm.cancel(alarm.arm(now + 60, lambda: fired.append("late")))
    time.sleep(0.3)
    assert fired == ["kept"] and len(alarm._heap) < 1100

"""Which addresses a download may connect to: the network guard's policy (pure).

A crawl fetches URLs that strangers wrote, from machines inside a private network. Without a
guard, one metadata row can make the crawler read a cloud instance's credentials
(169.254.169.254), an internal admin page (10.x, 127.x) or a local file. `AddressPolicy.refusal`
decides, for every address a URL resolves to and on every redirect hop, whether it may be
connected to:

  * refused: every range in BLOCKED (loopback, private, link-local, CGNAT, multicast,
    unspecified, reserved, broadcast, benchmark, documentation, IPv6 ULA / site-local /
    link-local, everything outside IPv6 global unicast), and anything `ipaddress` does not
    call global;
  * IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d, translated ::ffff:0:a.b.c.d,
    compatible ::a.b.c.d, NAT64 64:ff9b::a.b.c.d, 6to4 2002:AABB:CCDD::) are judged by the IPv4
    address the packets really reach;
  * allowed: an address inside one of the user's `allow_networks` (e.g. 127.0.0.0/8 for a
    loopback test server) — except the cloud-metadata endpoints (METADATA), which only a
    network naming that single address (`169.254.169.254/32`) opens: allowing 100.64.0.0/10
    for an internal image host must not open Alibaba's metadata server at 100.100.100.200.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (range, name in the ledger reason); first match names the refusal, specific before general.
_BLOCKED = (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link_local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmark"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"), ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "private"),
    ("2001:2::/48", "benchmark"), ("2001:db8::/32", "documentation"), ("2001::/23", "reserved"),
    ("3fff::/20", "documentation"), ("fc00::/7", "private"), ("fe80::/10", "link_local"),
    ("fec0::/10", "site_local"), ("ff00::/8", "multicast"),
)
BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple((ipaddress.ip_network(n), name) for n, name in _BLOCKED)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")  # IPv6 outside it is not routable on the internet

# Cloud instance-metadata endpoints: refused even inside an allowed network, unless a network
# of exactly that one address is allowed.
METADATA: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean, Hetzner
    "169.254.170.2",  # AWS ECS task credentials
    "169.254.170.23",  # AWS EKS pod identity
    "169.254.0.23",  # Tencent Cloud
    "169.254.42.42",  # Scaleway
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (legacy)
    "fd00:ec2::254",  # AWS (IPv6)
    "fd00:ec2::23",  # AWS EKS pod identity (IPv6)
    "fd20:ce::254",  # GCP (IPv6)
))

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, translated, compatible, NAT64,
    6to4), or None."""
    if ip.version == 4:
        return None
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return ip.ipv4_mapped
    if n >> 32 == 0xFFFF0000:  # ::ffff:0:a.b.c.d (SIIT, RFC 2765)
        return low
    if n >> 32 == 0 and n > 1:  # ::a.b.c.d (deprecated IPv4-compatible); :: and ::1 are IPv6's own
        return low
    if ip in _NAT64:  # 64:ff9b::a.b.c.d (RFC 6052)
        return low
    return ip.sixtofour  # 2002:AABB:CCDD:: -> A.B.C.D, else None


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`["127.0.0.0/8", "fd00::/8"]` -> networks; ValueError naming a bad entry (host bits set
    are an error: `127.0.0.1/8` probably meant something else)."""
    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(str(c).strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"allow_networks: {c!r} is not a network in CIDR form ({exc})") from None
    return tuple(out)


@dataclass(frozen=True)
class AddressPolicy:
    """The guard's decision for one address; picklable, so img2dataset's workers (spawned
    processes, Ray workers) get the same one."""

    allow: tuple[IPNetwork, ...] = ()  # networks the user explicitly allowed (allow_networks)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> "AddressPolicy":
        return cls(parse_networks(cidrs))

    def refusal(self, ip: IPAddress) -> str | None:
        """None when `ip` may be connected to, else why not: `loopback`, `private`, `metadata`, ..."""
        target = embedded_ipv4(ip) or ip  # where the packets really go
        if target in METADATA:
            exact = any(n.num_addresses == 1 and target in n for n in self.allow)
            return None if exact else "metadata"
        if self._allowed(ip) or self._allowed(target):
            return None
        return blocked_range(target)

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.allow)


def blocked_range(ip: IPAddress) -> str | None:
    """The name of the refused range `ip` is in, or None for a public address."""
    for net, name in BLOCKED:
        if ip.version == net.version and ip in net:
            return name
    if ip.version == 6 and ip not in GLOBAL_UNICAST_V6:
        return "reserved"
    if not ip.is_global:
        return "reserved"  # whatever this Python's ipaddress knows that the table lacks
    return None

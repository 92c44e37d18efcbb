"""SSRF guard: never let a scraped URL make likerank talk to its own network.

A URL found in a post (an image, a redirect target, a ``Link`` header) is attacker-chosen.
Before any request, its host is resolved and *every* address it resolves to must be a
public unicast address; loopback, private (RFC 1918, ULA), link-local (169.254/16, which
holds the cloud metadata endpoints 169.254.169.254 and 169.254.170.2), shared (100.64/10),
multicast, reserved and unspecified addresses are refused. The check runs again on every
redirect hop (redirects are followed by hand, see :mod:`pipeline.scrape.http`), and once more on the
connected socket's peer address, which closes the gap a DNS answer that changes between the
check and the connect (DNS rebinding) would otherwise leave.

``allow_hosts`` exempts exact host names or IP addresses (tests allow ``127.0.0.1`` for the
local simulator and nothing else).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

#: Cloud metadata endpoints that are not caught by the generic ranges on every platform
#: (AWS IMDS over IPv6, Alibaba Cloud); listed explicitly so the intent is visible.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),   # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),     # AWS ECS task metadata
    ipaddress.ip_address("fd00:ec2::254"),     # AWS IMDS, IPv6
    ipaddress.ip_address("100.100.100.200"),   # Alibaba Cloud
})
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix


class BlockedURL(Exception):
    """The URL's host is (or resolves to) an address likerank must not contact."""


class UnresolvableHost(Exception):
    """DNS could not resolve the URL's host."""


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` may not be contacted, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that address: judge the embedded one.
        # Python 3.11 treats 6to4 (2002::/16) as global (``ip_address("2002:a00:1::").is_global``
        # is True there), and NAT64 (64:ff9b::/96) and Teredo hand the packet to the IPv4
        # network on the way.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for name in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return f"a {name.replace('_', '-')} address"
    if not ip.is_global:  # e.g. 100.64.0.0/10 shared address space, documentation ranges
        return "not a global address"
    return None


class SSRFGuard:
    """Checks URLs (before connecting) and peer addresses (after connecting)."""

    def __init__(self, allow_hosts: Iterable[str] = ()):
        self.allow = frozenset(h.strip().lower().strip("[]") for h in allow_hosts if h.strip())

    def allowed_host(self, host: str) -> bool:
        return host.lower().strip("[]") in self.allow

    def check_ip(self, ip_text: str, host: str = "") -> None:
        """Raise :class:`BlockedURL` unless ``ip_text`` (the address ``host`` resolved to) is allowed."""
        if self.allowed_host(host) or self.allowed_host(ip_text):
            return
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        problem = address_problem(ip)
        if problem:
            shown = f"{host} -> {ip_text}" if host and host != ip_text else ip_text
            raise BlockedURL(f"blocked: {shown} is {problem}")

    def check_url(self, url: str) -> None:
        """Raise :class:`BlockedURL` (or :class:`UnresolvableHost`) unless ``url`` may be fetched."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BlockedURL(f"blocked: scheme {parts.scheme!r} is not http(s) in {url}")
        host = (parts.hostname or "").lower()
        if not host:
            raise BlockedURL(f"blocked: no host in {url}")
        if self.allowed_host(host):
            return
        if host in METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
            raise BlockedURL(f"blocked: host {host} is an internal name")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise BlockedURL(f"blocked: bad port in {url}") from None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnresolvableHost(f"cannot resolve {host}: {exc}") from None
        for info in infos:
            self.check_ip(info[4][0], host)

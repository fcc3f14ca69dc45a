"""SSRF guard for result URLs.

The upstream's status answer tells us where to download the video from. That
answer is input we do not control: a hostile or compromised upstream (or a
redirect from the storage host) could point a worker at 127.0.0.1, the Redis
port, a LAN service or a cloud metadata endpoint and have the worker fetch it.
So, before every request and again on every redirect `Location`, the caller
runs `check_url`: only http(s), no userinfo, and every address the host
resolves to must be public unless the operator allowed it (the API base URL's
own host, e.g. the local sandbox, or `allowlist` names/CIDRs). `check_size`
caps the announced and the running byte count.

Limit: the check resolves the name itself; the HTTP client resolves it again
when it connects, so a DNS answer that changes in between is not caught here.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, ResultRefused, UpstreamUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Iterable[tuple[Any, ...]]]  # socket.getaddrinfo's shape

_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class UrlPolicy:
    """What `check_url` lets through besides public addresses, and the size cap."""

    allowed_hosts: frozenset[str] = frozenset()  # lower-case, no trailing dot
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 2 * 1024**3

    @classmethod
    def build(cls, base_url: str, allowlist: str = "", max_bytes: int = 2 * 1024**3,
              *, resolve: Resolver = socket.getaddrinfo) -> UrlPolicy:
        """allowlist: comma-separated hostnames and/or CIDRs ('minio.local,10.0.0.0/8').

        The base URL's host is allowed, and so are its addresses (as /32 or /128)
        if it is a literal IP or resolves to non-public addresses.
        """
        hosts: set[str] = set()
        nets: list[IPNetwork] = []
        for entry in filter(None, (e.strip() for e in allowlist.split(","))):
            literal = _literal(entry)
            try:
                if literal is not None or "/" in entry:
                    nets.append(ipaddress.ip_network(literal or entry, strict=False))
                else:
                    hosts.add(_norm(entry))
            except ValueError as exc:
                raise ConfigError(f"bad URL allowlist entry {entry!r}: {exc}") from exc
        base_host = urlsplit(base_url).hostname
        if base_host:
            hosts.add(_norm(base_host))
            addr = _literal(base_host)
            if addr is not None:
                nets.append(ipaddress.ip_network(addr))
            else:
                try:
                    resolved = list(_resolve(base_host, resolve))
                except (OSError, UnicodeError, ValueError):
                    resolved = []  # the name itself is still allowed
                nets.extend(ipaddress.ip_network(a) for a in resolved if not _is_public(a))
        return cls(frozenset(hosts), tuple(nets), max_bytes)


def redacted(url: str) -> str:
    """scheme://host[:port]/path, without query, fragment and userinfo: for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.netloc:  # 'data:...', 'example.com/x': nothing host-like to show
        return f"{parts.scheme}:{parts.path[:40]}" if parts.scheme else parts.path[:40]
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"[:300]


def without_credentials(url: str) -> str:
    """A configured URL (Redis, S3) for a message: scheme://host:port/path, without
    userinfo, query and fragment (a Redis `?password=`, an S3 `?secret=` are as
    secret as a password). Everything up to the last '@' is taken out: a password
    holding an unencoded '/', '#' or '?' ends urlsplit's netloc early, so the
    split's userinfo is not enough (the password's tail would show as the path).
    A '?' or '#' before that '@' leaves it unknown whether the '@' ends a password
    or sits in a query's secret (`?password=a@b`): then only the scheme is shown."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        return "<not a URL>"
    userinfo, at, rest = rest.rpartition("@")
    if at and ("?" in userinfo or "#" in userinfo):
        return f"{scheme}://..."
    return f"{scheme}://{re.split('[?#]', rest, maxsplit=1)[0]}"[:300]


def host_problem(url: str) -> str | None:
    """Why a configured http(s) URL's host or port cannot be connected to, or
    None: checked when the setting is read, not by the first request of the
    night (urlsplit's ValueError was a traceback; a port of 99999 or a host
    with a space in it were taken). Nothing of the URL is in the answer."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        return "malformed (an unclosed '[', or a port that is not a number up to 65535)"
    host = parts.hostname
    if not host:
        return "no host"
    if _literal(host) is None and not all(c.isalnum() or c in "._-" for c in host):
        return "its host holds characters no host name has"
    return None


def check_url(url: str, policy: UrlPolicy, resolve: Resolver = socket.getaddrinfo) -> None:
    """Raise ResultRefused (message shows only `redacted(url)`) if the URL must not be fetched.

    Raises UpstreamUnavailable if the host cannot be resolved (a transient network problem).
    """
    shown = redacted(url)
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        raise ResultRefused(f"refused result URL {shown}: whitespace, control or '\\' characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ResultRefused(f"refused result URL {shown}: malformed ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ResultRefused(f"refused result URL {shown}: scheme {parts.scheme!r} not http(s)")
    if "@" in parts.netloc:
        raise ResultRefused(f"refused result URL {shown}: credentials in the URL")
    if not parts.hostname:
        raise ResultRefused(f"refused result URL {shown}: no host")
    host = _norm(parts.hostname)
    if host in policy.allowed_hosts:
        return
    literal = _literal(host)
    try:
        addrs = [literal] if literal else list(_resolve(parts.hostname, resolve))
    except UnicodeError:
        raise ResultRefused(f"refused result URL {shown}: invalid host name") from None
    except OSError as exc:
        raise UpstreamUnavailable(f"cannot resolve host of {shown}: {exc}") from None
    if not addrs:
        raise UpstreamUnavailable(f"cannot resolve host of {shown}: no addresses")
    for addr in addrs:
        if not _is_public(addr) and not any(addr in n for n in policy.allowed_networks):
            raise ResultRefused(f"refused result URL {shown}: {host} is non-public address {addr}")


def check_size(announced_or_running_total: int, policy: UrlPolicy) -> None:
    """Raise ResultRefused if more than policy.max_bytes."""
    if (n := announced_or_running_total) > policy.max_bytes:
        raise ResultRefused(f"result is {n} bytes, over the {policy.max_bytes} byte cap")


def _norm(host: str) -> str:
    return host.lower().removesuffix(".")


def _literal(host: str) -> IPAddress | None:
    """An IP literal, including integer/octal/hex forms inet_aton (so the HTTP client) takes."""
    host = _norm(host.strip("[]"))
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


def _resolve(host: str, resolve: Resolver) -> Iterator[IPAddress]:
    for info in resolve(host, None, 0, socket.SOCK_STREAM):
        yield ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])


def _is_public(addr: IPAddress) -> bool:
    """False for the address or any IPv4 it embeds (mapped, 6to4, NAT64) being non-global."""
    embedded: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        embedded += [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
        if addr in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return not any(
        a in _METADATA or not a.is_global or a.is_multicast or a.is_reserved
        or a.is_private or a.is_loopback or a.is_link_local or a.is_unspecified
        for a in embedded
    )

"""Where a webhook may send: the address rules (pure functions) and the check of a URL against them.

A URL's host is turned into the addresses a connection would reach (an IP literal in any spelling the
C library accepts, or a name looked up), and every one of them must be public, unless it lies in an
operator's allowance (GPUX_WEBHOOK_ALLOWED_NETS). The connection then goes to the address checked
(exchange/webhooks/sender.py), so a name cannot point elsewhere between the check and the connect.

Refused: loopback, private (RFC 1918, fc00::/7), link-local, shared (RFC 6598), unspecified,
multicast, broadcast, reserved, documentation and benchmarking ranges, and every IPv6 form that
carries an IPv4 address (mapped, compatible, translated, NAT64, 6to4) when that address is refused.
Teredo and anything outside IPv6 global unicast (2000::/3) are refused as reserved."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses it resolves to; raises LookupError when it resolves to none.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def _nets(*spec: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), kind) for net, kind in spec)


# First match wins (the broadcast address lies inside 240.0.0.0/4).
IPV4_REFUSED = _nets(
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "shared"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"), ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
IPV6_REFUSED = _nets(
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "reserved"), ("100::/64", "reserved"),
    ("2001::/32", "reserved"), ("2001:2::/48", "benchmarking"), ("2001:10::/28", "reserved"),
    ("2001:20::/28", "reserved"), ("2001:db8::/32", "documentation"), ("3fff::/20", "documentation"),
    ("fc00::/7", "private"), ("fe80::/10", "link-local"), ("fec0::/10", "private"), ("ff00::/8", "multicast"),
)
IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# IPv6 ranges whose addresses carry an IPv4 address (checked as that address).
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for or carries, if any."""
    if address in _MAPPED or address in _TRANSLATED or address in _COMPATIBLE or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFF_FFFF)
    return None


def parse_nets(text: str) -> tuple[IPNetwork, ...]:
    """GPUX_WEBHOOK_ALLOWED_NETS: comma-separated CIDRs (a bare address is its /32 or /128)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _allowed(address: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    inner = embedded_ipv4(address) if address.version == 6 else None
    return any(address in net or (inner is not None and inner in net) for net in allowed)


def address_kind(address: IPAddress) -> str | None:
    """Why an address is refused by default ('loopback', 'private', ...), or None if it is public."""
    if address.version == 4:
        return next((kind for net, kind in IPV4_REFUSED if address in net), None)
    if address.scope_id is not None:
        return "link-local"
    inner = embedded_ipv4(address)
    if inner is not None and address not in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")):
        return address_kind(inner) or (None if address in _NAT64 or address in _SIX_TO_FOUR else "reserved")
    kind = next((kind for net, kind in IPV6_REFUSED if address in net), None)
    if kind is None and address not in IPV6_GLOBAL_UNICAST:
        return "reserved"
    return kind


def address_refusal(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """None when a webhook may connect to `address`; else its kind. The allowance wins."""
    if _allowed(address, allowed):
        return None
    return address_kind(address)


def _ipv4_number(part: str) -> int | None:
    """One part of an IPv4 address as the C library's inet_aton reads it: 0x.. hex, 0.. octal, decimal."""
    if not part.isascii():
        return None
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        if not digits:
            return 0  # "0x" alone is zero, as inet_aton and WHATWG read it
        return int(digits, 16) if all(c in "0123456789abcdefABCDEF" for c in digits) else None
    if not part.isdigit():
        return None
    if len(part) > 1 and part[0] == "0":
        return int(part, 8) if all(c in "01234567" for c in part) else None
    return int(part)


def looks_numeric(host: str) -> bool:
    """Whether a host's last label is a number: then it is an IPv4 address or no host at all (WHATWG)."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return _ipv4_number(last) is not None


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any of its forms: dotted, short (127.1), integer (2130706433), hex
    (0x7f000001, 0x7f.0.0.1), octal (0177.0.0.1), with a trailing dot; None when it is none."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_ipv4_number(part) for part in parts]
    if any(number is None for number in numbers):
        return None
    *head, last = numbers
    if any(number > 255 for number in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, number in enumerate(head):
        value += number << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True, slots=True)
class Destination:
    """A URL checked: where to connect (the first address) and what to tell the receiver."""
    scheme: str
    host: str  # ASCII (IDNA) host as the receiver knows it: its Host header and TLS name
    port: int
    addresses: tuple[IPAddress, ...]
    target: str  # path and query

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, address: IPAddress) -> str:
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.target}"


class Refused(Exception):
    """A URL a webhook may not send to; the message says why, for the caller's eyes (a 422, the log)."""


NAME_REFUSED = "the host does not resolve to a public address"
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def split_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
    except ValueError:
        raise Refused("an http or https URL with a valid host and port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise Refused("credentials in the URL are not sent: leave them out")
    return parts


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself (IPv6 in brackets, IPv4 in any form), else None for a name;
    Refused for a host that is neither."""
    if ":" in host:
        if "%" in host:
            raise Refused("an IPv6 address with a zone is not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused("not a valid IPv6 address") from None
    if looks_numeric(host):
        address = parse_ipv4(host)
        if address is None:
            raise Refused("not a valid IPv4 address")
        return address
    return None


def ascii_host(hostname: str) -> str:
    """The host as it goes on the wire (IDNA for a non-ASCII name), lower case, checked label by label."""
    host = hostname.lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise Refused("not a valid host name") from None
    if ":" in host:
        return host
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or any(not label or len(label) > 63 or not set(label) <= _LABEL_CHARS for label in labels):
        raise Refused("not a valid host name")
    return host


async def check_url(url: str, resolve: Resolver, allowed: Iterable[IPNetwork] = ()) -> Destination:
    """The destination of a webhook URL with every address it reaches checked; Refused with why."""
    parts = split_url(url)
    host = ascii_host(parts.hostname)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    literal = literal_address(host)
    if literal is not None:
        kind = address_refusal(literal, allowed)
        if kind is not None:
            raise Refused(f"the host is a {kind} address")
        return Destination(parts.scheme, host, port, (literal,), target)
    name = host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: loopback, never looked up
        addresses = [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    else:
        try:
            addresses = await resolve(name, port)
        except LookupError:
            raise Refused(NAME_REFUSED) from None
    # Every address must pass: a name that also points inside would otherwise be one retry away.
    if not addresses or any(address_refusal(address, allowed) is not None for address in addresses):
        raise Refused(NAME_REFUSED)
    return Destination(parts.scheme, host, port, tuple(dict.fromkeys(addresses)), target)

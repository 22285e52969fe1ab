"""The webhook destination rules as pure functions: every spelling of every refused range, the
operator's allowance, names looked up through a resolver the test controls. Nothing connects."""
from __future__ import annotations

import ipaddress

import pytest

from exchange.webhooks.destinations import (NAME_REFUSED, Refused, address_kind, address_refusal, check_url,
                                            embedded_ipv4, parse_ipv4, parse_nets)
from exchange.webhooks.resolvers import hosts_entries

ip = ipaddress.ip_address


@pytest.mark.parametrize("spelling, meant", [
    ("127.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"), ("0X7F000001", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("0177.1", "127.0.0.1"), ("017700000001", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"),
    ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("0.0.0.0", "0.0.0.0"), ("10.1", "10.0.0.1"), ("167772161", "10.0.0.1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("2852039166", "169.254.169.254"), ("4294967295", "255.255.255.255"),
    ("8.8.8.8", "8.8.8.8"), ("0x08080808", "8.8.8.8"),
])
def test_ipv4_is_read_in_every_form_the_c_library_accepts(spelling: str, meant: str) -> None:
    assert parse_ipv4(spelling) == ipaddress.IPv4Address(meant)


@pytest.mark.parametrize("spelling", ["256.0.0.1", "1.2.3.4.5", "4294967296", "08.0.0.1", "0x1g", "1..2", "", ".",
                                      "1.2.3.256", "1.2.65536", "١٢٧.0.0.1", "127.0.0.1x"])
def test_what_is_no_ipv4_address_is_not_read_as_one(spelling: str) -> None:
    assert parse_ipv4(spelling) is None


REFUSED = {
    "loopback": ["127.0.0.1", "127.255.255.254", "::1"],
    "private": ["10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.0.1", "fc00::1", "fd12:3456::1",
                "fec0::1"],
    "link-local": ["169.254.0.1", "169.254.169.254", "fe80::1", "febf::1"],
    "shared": ["100.64.0.1", "100.127.255.254"],
    "unspecified": ["0.0.0.0", "0.1.2.3", "::"],
    "multicast": ["224.0.0.1", "239.255.255.255", "ff02::1", "ff0e::1"],
    "broadcast": ["255.255.255.255"],
    "reserved": ["240.0.0.1", "192.0.0.8", "192.88.99.1", "2001::1", "2001:10::1", "100::1", "64:ff9b:1::1",
                 "1234::1", "4000::1", "::2:0:0:0"],
    "documentation": ["192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1", "3fff::1"],
    "benchmarking": ["198.18.0.1", "198.19.255.255", "2001:2::1"],
}
# IPv6 addresses that carry a refused IPv4 address, and the kind they are refused as.
CARRIED = [("::ffff:127.0.0.1", "loopback"), ("::ffff:7f00:1", "loopback"), ("::127.0.0.1", "loopback"),
           ("::ffff:0:127.0.0.1", "loopback"), ("64:ff9b::127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"),
           ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"), ("64:ff9b::a00:1", "private"),
           ("2002:c0a8:101::1", "private"), ("::ffff:0.0.0.0", "unspecified"), ("::ffff:100.64.0.1", "shared")]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.15.255.255", "172.32.0.0",
          "192.167.255.255", "169.253.255.255", "223.255.255.255", "2606:4700:4700::1111", "2a00:1450:4001::1",
          "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("kind, address", [(kind, a) for kind, addresses in REFUSED.items() for a in addresses])
def test_each_internal_range_is_refused_by_its_kind(kind: str, address: str) -> None:
    assert address_kind(ip(address)) == kind
    assert address_refusal(ip(address)) == kind


@pytest.mark.parametrize("address, kind", CARRIED)
def test_ipv6_forms_of_a_refused_ipv4_address_are_refused_as_it(address: str, kind: str) -> None:
    assert embedded_ipv4(ipaddress.IPv6Address(address)) is not None
    assert address_kind(ip(address)) == kind


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ip(address)) is None


def test_the_allowance_admits_its_networks_only() -> None:
    allowed = parse_nets(" 127.0.0.0/8 , ::1, 10.1.0.0/16,")
    assert [str(n) for n in allowed] == ["127.0.0.0/8", "::1/128", "10.1.0.0/16"]
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "10.1.2.3"):
        assert address_refusal(ip(address), allowed) is None, address
    for address in ("10.2.0.1", "169.254.169.254", "192.168.1.1", "::"):
        assert address_refusal(ip(address), allowed) is not None, address
    assert parse_nets("") == ()


class Names:
    """A resolver the test controls: name -> addresses; a name it does not know does not resolve."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list:
        self.asked.append(host)
        if host not in self.table:
            raise LookupError(host)
        return [ip(a) for a in self.table[host]]


LOOPBACK_URLS = ["http://127.0.0.1/", "http://localhost/", "http://LocalHost./", "http://x.localhost/", "http://127.1/",
                 "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/", "http://0x7f.1/",
                 "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://0.0.0.0/", "http://0/",
                 "http://[::1]/", "http://[0:0:0:0:0:0:0:1]/", "http://[::]/", "https://127.0.0.1:8443/x?y=1",
                 "http://127.0.0.1.:80/", "http://１２７.０.０.１/", "http://①②⑦.0.0.1/"]


@pytest.mark.parametrize("url", LOOPBACK_URLS)
async def test_loopback_in_any_spelling_is_refused(url: str) -> None:
    names = Names({})
    with pytest.raises(Refused):
        await check_url(url, names)
    assert names.asked == []  # an address or localhost: nothing was looked up


@pytest.mark.parametrize("url, message", [
    ("ftp://8.8.8.8/", "an http or https URL with a host"), ("http:///x", "an http or https URL with a host"),
    ("http://[zz]/", "an http or https URL with a valid host and port"),
    ("http://8.8.8.8:99999/", "an http or https URL with a valid host and port"),
    ("http://user:pw@8.8.8.8/", "credentials in the URL are not sent: leave them out"),
    ("http://[fe80::1%25eth0]/", "an IPv6 address with a zone is not allowed"),
    ("http://1.2.3.999/", "not a valid IPv4 address"), ("http://example.123/", "not a valid IPv4 address"),
    ("http://exa mple.com/", "not a valid host name"), ("http://a..b/", "not a valid host name"),
    ("http://169.254.169.254/", "the host is a link-local address"),
])
async def test_a_refusal_says_why(url: str, message: str) -> None:
    with pytest.raises(Refused) as refused:
        await check_url(url, Names({}))
    assert str(refused.value) == message


async def test_a_name_passes_only_if_every_address_it_resolves_to_is_public() -> None:
    names = Names({"hooks.tenant.test": ["93.184.216.34", "2606:2800:220:1::1"],
                   "split.tenant.test": ["93.184.216.34", "10.0.0.5"], "meta.tenant.test": ["169.254.169.254"],
                   "mapped.tenant.test": ["::ffff:127.0.0.1"]})
    destination = await check_url("https://Hooks.Tenant.Test:8443/in?x=1", names)
    assert destination.host == "hooks.tenant.test" and destination.port == 8443 and destination.target == "/in?x=1"
    assert destination.host_header == "hooks.tenant.test:8443"
    assert destination.url_for(destination.addresses[0]) == "https://93.184.216.34:8443/in?x=1"
    assert destination.url_for(destination.addresses[1]) == "https://[2606:2800:220:1::1]:8443/in?x=1"
    for name in ("split", "meta", "mapped", "unknown"):
        with pytest.raises(Refused) as refused:
            await check_url(f"http://{name}.tenant.test/", names)
        # The same words whether it does not resolve or resolves inside: no oracle of internal names.
        assert str(refused.value) == NAME_REFUSED
    allowed = parse_nets("10.0.0.0/8")
    assert (await check_url("http://split.tenant.test/", names, allowed)).addresses[1] == ip("10.0.0.5")


async def test_an_idna_name_is_looked_up_in_its_ascii_form() -> None:
    names = Names({"xn--bcher-kva.example": ["93.184.216.34"]})
    destination = await check_url("https://bücher.example/", names)
    assert destination.host == "xn--bcher-kva.example" and destination.host_header == "xn--bcher-kva.example"


def test_the_hosts_file_is_read_as_the_c_library_reads_it() -> None:
    entries = hosts_entries("127.0.0.1 localhost\n# comment\n::1 ip6-localhost ip6-loopback # tail\n"
                            "10.0.0.7 Db.Internal.\nbogus line\n93.184.216.34 hooks.example\n")
    assert entries["db.internal"] == [ip("10.0.0.7")] and entries["hooks.example"] == [ip("93.184.216.34")]
    assert entries["ip6-loopback"] == [ip("::1")] and "bogus" not in entries


async def test_one_account_has_at_most_its_share_of_checks_in_flight() -> None:
    import asyncio

    from exchange.webhooks.resolvers import Busy, Destinations

    release = asyncio.Event()

    async def slow(host: str, port: int) -> list:  # a name server that takes its time
        await release.wait()
        return [ip("93.184.216.34")]

    destinations = Destinations(slow, account_cap=2)
    waiting = [asyncio.create_task(destinations.check("http://slow.example/", account_id=1)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Busy):
        await destinations.check("http://slow.example/", account_id=1)
    other = asyncio.create_task(destinations.check("http://slow.example/", account_id=2))  # not held up by 1
    await asyncio.sleep(0)
    release.set()
    for task in [*waiting, other]:
        assert (await task).addresses == (ip("93.184.216.34"),)
    assert not destinations.in_flight

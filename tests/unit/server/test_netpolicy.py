"""What a local sandbox's network may reach."""

import pytest

from opensandbox_platform.server.runtimes import netpolicy

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.2
           /32 host LOCAL
"""


def test_host_addresses_are_the_local_ones() -> None:
    assert netpolicy.host_addresses(FIB_TRIE) == ["127.0.0.1", "192.0.2.2"]


def test_the_ruleset_rejects_host_private_and_metadata_ranges() -> None:
    rules = netpolicy.ruleset(host=["192.0.2.2"], allow=["10.1.0.0/16"], deny=["203.0.113.0/24"])
    denied = rules.split("set denied")[1].split("}")[0]
    for network in ("10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert network in denied
    assert "192.0.2.2/32" in denied and "203.0.113.0/24" in denied
    assert "10.1.0.0/16" in rules.split("set allowed")[1].split("}")[0]
    lines = [line.strip() for line in rules.splitlines()]
    # order matters: loopback (by interface, then by address: a redirected DNS query), then DNS to
    # slirp's forwarder, then the operator's exceptions, then the denials
    order = [i for i, line in enumerate(lines) if line.startswith(("oifname", "ip daddr", "meta nfproto"))]
    assert [lines[i].split()[0:3] for i in order] == [
        ["oifname", '"lo"', "accept"],
        ["ip", "daddr", "127.0.0.0/8"],
        ["ip", "daddr", netpolicy.SLIRP_DNS],
        ["ip", "daddr", "@allowed"],
        ["ip", "daddr", "@denied"],
        ["meta", "nfproto", "ipv6"],
    ]


def test_overlapping_denials_are_merged_and_an_empty_allow_set_is_valid() -> None:
    rules = netpolicy.ruleset(host=["10.77.0.1"], deny=["10.1.2.0/24"])
    denied = rules.split("set denied")[1].split("}")[0]
    assert "10.77.0.1/32" not in denied and "10.1.2.0/24" not in denied  # inside 10.0.0.0/8
    assert "elements" not in rules.split("set allowed")[1].split("}")[0]


def test_bad_networks_are_refused() -> None:
    with pytest.raises(ValueError):
        netpolicy.normalize(["not-a-network"])
    with pytest.raises(ValueError):
        netpolicy.normalize(["fd00::/8"])
    assert netpolicy.normalize(["10.1.2.3/16"]) == ["10.1.0.0/16"]


def test_loopback_only_drops_everything_else() -> None:
    rules = netpolicy.loopback_ruleset()
    assert "policy drop" in rules and 'oifname "lo" accept' in rules

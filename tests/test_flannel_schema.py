"""flannel's etcd schema: read as flannel's Go code reads it, written byte for byte as it writes.

The fixtures are what flannel v0.2x stores, derived from its source: LeaseAttrs marshalled by
encoding/json (fields PublicIP, PublicIPv6, BackendType and BackendData with omitempty on the
last two; ip.IP4 as a quoted dotted quad, a nil *ip.IP6 as null); vxlan's BackendData is
vxlanLeaseAttrs{VNI uint16; VtepMAC hardwareAddr} with the MAC as net.HardwareAddr.String();
flannel's udp backend sets only PublicIP. Keys are MakeSubnetKey's "a.b.c.d-len".
"""

from __future__ import annotations

import ipaddress

import pytest

from overlayd.control.flannel_schema import (
    Lease,
    NetworkConfig,
    config_key,
    lease_json,
    network_config_json,
    normalise_mac,
    parse_lease,
    parse_network_config,
    parse_subnet_key,
    subnet_key,
    subnets_prefix,
)
from overlayd.control.problems import ConfigError

FLANNEL_VXLAN_LEASE = (b'{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"vxlan",'
                       b'"BackendData":{"VNI":1,"VtepMAC":"0e:2a:7f:00:00:01"}}')
FLANNEL_UDP_LEASE = b'{"PublicIP":"192.168.77.2","PublicIPv6":null}'
KEY = "/coreos.com/network/subnets/10.5.1.0-24"
IP1 = ipaddress.IPv4Address("192.168.77.1")


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[tuple[str, str]]:
    return [(p.key, p.reason) for p in excinfo.value.problems]


# -- leases -------------------------------------------------------------------------------------

def test_vxlan_lease_written_byte_for_byte_as_flannel_writes_it() -> None:
    written = lease_json(IP1, "vxlan", vni=1, vtep_mac="0E-2A-7F-00-00-01")
    assert written == FLANNEL_VXLAN_LEASE


def test_udp_lease_written_as_flannels_udp_backend_writes_it() -> None:
    assert lease_json(ipaddress.IPv4Address("192.168.77.2"), "") == FLANNEL_UDP_LEASE


def test_flannel_leases_parse_field_by_field() -> None:
    assert parse_lease(KEY, FLANNEL_VXLAN_LEASE) == Lease(
        subnet=ipaddress.IPv4Network("10.5.1.0/24"), public_ip=IP1, public_ipv6=None,
        backend_type="vxlan", vni=1, vtep_mac="0e:2a:7f:00:00:01")
    udp = parse_lease("/coreos.com/network/subnets/10.5.2.0-24", FLANNEL_UDP_LEASE)
    assert (udp.backend_type, udp.vni, udp.vtep_mac) == ("", None, None)
    assert udp.public_ip == ipaddress.IPv4Address("192.168.77.2")


def test_lease_round_trip() -> None:
    ipv6 = ipaddress.IPv6Address("fd00::1")
    raw = lease_json(IP1, "vxlan", vni=4096, vtep_mac="02:00:00:00:00:09", public_ipv6=ipv6)
    lease = parse_lease(KEY, raw)
    assert (lease.public_ip, lease.public_ipv6, lease.vni, lease.vtep_mac) == \
        (IP1, ipv6, 4096, "02:00:00:00:00:09")


def test_lease_keys_are_case_insensitive_and_the_last_spelling_wins() -> None:
    raw = (b'{"publicip":"10.0.0.9","PUBLICIP":"192.168.77.1","backendtype":"vxlan",'
           b'"backenddata":{"vni":3,"vtepmac":"aa:bb:cc:dd:ee:ff"},"Unknown":1}')
    lease = parse_lease(KEY, raw)
    assert (lease.public_ip, lease.backend_type, lease.vni, lease.vtep_mac) == \
        (IP1, "vxlan", 3, "aa:bb:cc:dd:ee:ff")


def test_a_json_null_leaves_a_field_as_it_was_as_in_go() -> None:
    raw = b'{"PublicIP":"192.168.77.1","publicip":null,"BackendData":null}'
    lease = parse_lease(KEY, raw)
    assert lease.public_ip == IP1 and lease.vni is None


def test_macs_in_every_form_go_accepts_are_normalised() -> None:
    assert normalise_mac("0E:2A:7F:00:00:01") == "0e:2a:7f:00:00:01"
    assert normalise_mac("0e-2a-7f-00-00-01") == "0e:2a:7f:00:00:01"
    assert normalise_mac("0e2a.7f00.0001") == "0e:2a:7f:00:00:01"
    for bad in ("0e:2a:7f:00:00", "0e:2a-7f:00:00:01", "zz:2a:7f:00:00:01", ""):
        assert normalise_mac(bad) is None


@pytest.mark.parametrize("key, raw, where, reason", [
    (KEY, b"garbage", "", "not JSON"),
    (KEY, b"[1]", "", "must be a JSON object, not an array"),
    (KEY, b'{"PublicIP":"300.1.1.1"}', "PublicIP", "is not an IPv4 address"),
    (KEY, b'{"PublicIP":"fd00::1"}', "PublicIP", "is not an IPv4 address"),
    (KEY, b"{}", "PublicIP", "missing"),
    (KEY, b'{"PublicIP":"1.2.3.4","PublicIPv6":"x"}', "PublicIPv6", "not an IPv6 address"),
    (KEY, b'{"PublicIP":"1.2.3.4","BackendType":7}', "BackendType", "must be a string"),
    (KEY, b'{"PublicIP":"1.2.3.4","BackendType":"vxlan"}', "BackendData.VtepMAC", "missing"),
    (KEY, b'{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VtepMAC":"zz"}}',
     "BackendData.VtepMAC", "not a MAC address"),
    (KEY, b'{"PublicIP":"1.2.3.4","BackendData":{"VNI":70000,"VtepMAC":"02:00:00:00:00:01"}}',
     "BackendData.VNI", "out of range"),
    (KEY, b'{"PublicIP":"1.2.3.4","BackendData":{"VNI":1.5}}', "BackendData.VNI",
     "must be an integer"),
    ("/coreos.com/network/subnets/10.5.1.1-24", FLANNEL_UDP_LEASE, "", "host bits set"),
    ("/coreos.com/network/subnets/config", FLANNEL_UDP_LEASE, "", "not a subnet key"),
    ("/coreos.com/network/subnets/10.5.1.0-33", FLANNEL_UDP_LEASE, "", "not a subnet key"),
])
def test_bad_leases_name_the_key_field_and_reason(key: str, raw: bytes, where: str,
                                                  reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_lease(key, raw)
    found = problems(caught)
    assert any(k == where and reason in r for k, r in found), found
    assert all(p.file == key for p in caught.value.problems)


def test_subnet_keys() -> None:
    net = ipaddress.IPv4Network("10.5.7.0/24")
    assert subnet_key(net) == "/coreos.com/network/subnets/10.5.7.0-24"
    assert subnet_key(net, "/x/") == "/x/subnets/10.5.7.0-24"
    assert parse_subnet_key(subnet_key(net)) == (net, None)
    assert parse_subnet_key("/p/subnets/10.5.7.0-24&fd00:5:7::-64") == (
        net, ipaddress.IPv6Network("fd00:5:7::/64"))
    assert subnets_prefix("/p") == "/p/subnets/" and config_key("/p/") == "/p/config"


# -- network config -----------------------------------------------------------------------------

def test_config_defaults_are_flannels() -> None:
    config = parse_network_config(b'{"Network":"10.5.0.0/16"}')
    assert config == NetworkConfig(
        ipaddress.IPv4Network("10.5.0.0/16"), 24, ipaddress.IPv4Address("10.5.1.0"),
        ipaddress.IPv4Address("10.5.255.0"), "udp", 8285, 1)
    small = parse_network_config(b'{"Network":"10.5.0.0/26","Backend":{"Type":"vxlan"}}')
    assert (small.subnet_len, small.subnet_min, small.subnet_max, small.port) == \
        (28, ipaddress.IPv4Address("10.5.0.16"), ipaddress.IPv4Address("10.5.0.48"), 8472)


def test_config_keys_are_case_insensitive() -> None:
    config = parse_network_config(b'{"network":"10.5.0.0/16","subnetlen":26,'
                                  b'"SUBNETMIN":"10.5.0.64","backend":{"type":"vxlan",'
                                  b'"vni":9,"port":4789}}')
    assert (config.subnet_len, str(config.subnet_min), config.backend_type, config.vni,
            config.port) == (26, "10.5.0.64", "vxlan", 9, 4789)


def test_config_written_as_an_operator_writes_it_for_flannel() -> None:
    raw = network_config_json(ipaddress.IPv4Network("10.5.0.0/16"), subnet_len=26,
                              backend_type="vxlan", vni=4)
    assert raw == b'{"Network":"10.5.0.0/16","SubnetLen":26,"Backend":{"Type":"vxlan","VNI":4}}'
    assert parse_network_config(raw).vni == 4


@pytest.mark.parametrize("raw, where, reason", [
    (b"{", "", "not JSON"),
    (b'"x"', "", "must be a JSON object"),
    (b"{}", "Network", "missing"),
    (b'{"Network":"10.5.0.1/16"}', "Network", "host bits set"),
    (b'{"Network":"10.5.0.0/30"}', "Network", "too small"),
    (b'{"Network":"10.5.0.0/16","SubnetLen":17}', "SubnetLen", "does not fit four times"),
    (b'{"Network":"10.5.0.0/16","SubnetLen":31}', "SubnetLen", "at most 30"),
    (b'{"Network":"10.5.0.0/16","SubnetLen":"24"}', "SubnetLen", "must be an integer"),
    (b'{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}', "SubnetMin", "outside Network"),
    (b'{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.4"}', "SubnetMax", "boundary"),
    (b'{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}', "SubnetMin",
     "above SubnetMax"),
    (b'{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}', "Backend.Type", "not one of"),
    (b'{"Network":"10.5.0.0/16","Backend":"vxlan"}', "Backend", "must be an object"),
    (b'{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":65536}}', "Backend.VNI",
     "out of range"),
    (b'{"Network":"10.5.0.0/16","Backend":{"Port":0}}', "Backend.Port", "out of range"),
])
def test_bad_configs_name_the_field_and_reason(raw: bytes, where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_network_config(raw)
    found = problems(caught)
    assert any(k == where and reason in r for k, r in found), found
    assert str(caught.value).startswith("/coreos.com/network/config: ")


def test_vxlan_port_zero_means_the_kernel_default() -> None:
    config = parse_network_config(b'{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","Port":0}}')
    assert config.port == 8472

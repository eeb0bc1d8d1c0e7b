"""flannel's wireguard lease and network config in etcd (BackendType "wireguard",
BackendData {"PublicKey", "Port"}), read and written."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest

from overlayd.control.flannel_schema import lease_json, parse_lease, parse_network_config
from overlayd.control.problems import ConfigError
from overlayd.control.wg_noise import generate_private_key, public_key

KEY = base64.b64encode(public_key(generate_private_key())).decode()
LEASE_KEY = "/coreos.com/network/subnets/10.5.3.0-24"


def test_wireguard_lease_round_trip() -> None:
    raw = lease_json(ipaddress.IPv4Address("192.0.2.3"), "wireguard", public_key=KEY,
                     port=51821)
    assert json.loads(raw) == {"PublicIP": "192.0.2.3", "PublicIPv6": None,
                               "BackendType": "wireguard",
                               "BackendData": {"PublicKey": KEY, "Port": 51821}}
    lease = parse_lease(LEASE_KEY, raw)
    assert lease.backend_type == "wireguard"
    assert lease.public_key == KEY and lease.port == 51821


def test_flannel_written_lease_without_port_reads() -> None:
    raw = json.dumps({"PublicIP": "192.0.2.3", "BackendType": "wireguard",
                      "BackendData": {"PublicKey": KEY}}).encode()
    lease = parse_lease(LEASE_KEY, raw)
    assert lease.public_key == KEY and lease.port is None


@pytest.mark.parametrize("data", [{}, {"PublicKey": "nope"}, {"PublicKey": KEY[:-4]}, None])
def test_wireguard_lease_needs_a_public_key(data: object) -> None:
    raw = json.dumps({"PublicIP": "192.0.2.3", "BackendType": "wireguard",
                      "BackendData": data}).encode()
    with pytest.raises(ConfigError, match="BackendData.PublicKey"):
        parse_lease(LEASE_KEY, raw)


def test_network_config_wireguard_ports() -> None:
    default = parse_network_config(b'{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard"}}')
    assert default.backend_type == "wireguard" and default.port == 51820
    flannel = parse_network_config(
        b'{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "ListenPort": 51999}}')
    assert flannel.port == 51999

"""WireGuard's handshake: primitives against published vectors and libsodium, the state
machine between two of our devices, and a full handshake + transport with wireguard-go."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from netns_helpers import netns_required
from wg_helpers import open_transport, seal_transport, udp_socket_in_netns

from overlayd.control.wg_handshake import INITIATION_MIN_INTERVAL
from overlayd.control.wg_noise import (
    INITIAL_CHAIN,
    INITIAL_HASH,
    generate_private_key,
    hchacha20,
    kdf,
    public_key,
    tai64n,
    xaead_decrypt,
    xaead_encrypt,
)
from overlayd.control.wg_peers import (
    DropStaged,
    Install,
    Keepalive,
    PeerConfig,
    Send,
    SetEndpoint,
    WgDevice,
)
from overlayd.control.wg_timers import Activity, Timings
from overlayd.lab import add_netns, del_netns, run_prefix
from overlayd.lab.wireguard_go import WireguardGoPeer, b64, wireguard_go_unavailable
from overlayd.wire import wireguard as wg
from overlayd.wire.ipv4 import checksum

UNIX_NS = 1_800_000_000 * 10**9


def _sodium() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("sodium")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    return lib if lib.sodium_init() >= 0 else None


# -- primitives ---------------------------------------------------------------------------------

def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


@pytest.mark.skipif(_sodium() is None, reason="libsodium not installed")
def test_xchacha20poly1305_matches_libsodium() -> None:
    sodium = _sodium()
    assert sodium is not None
    rng = random.Random(7)
    for length in (0, 1, 16, 17, 64):
        key, nonce = rng.randbytes(32), rng.randbytes(24)
        msg, aad = rng.randbytes(length), rng.randbytes(16)
        out = ctypes.create_string_buffer(length + 16)
        out_len = ctypes.c_ulonglong()
        sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            out, ctypes.byref(out_len), msg, ctypes.c_ulonglong(length), aad,
            ctypes.c_ulonglong(len(aad)), None, nonce, key)
        ours = xaead_encrypt(key, nonce, msg, aad)
        assert ours == out.raw[:out_len.value]
        assert xaead_decrypt(key, nonce, ours, aad) == msg


def test_kdf_is_hkdf_over_hmac_blake2s() -> None:
    key, data = b"k" * 32, b"input"
    prk = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(prk, t2 + b"\x03", hashlib.blake2s).digest()
    assert kdf(key, data, 3) == (t1, t2, t3)


def test_initial_chaining_key_and_hash_are_the_protocol_constants() -> None:
    # The values every WireGuard implementation starts from (wireguard-go's
    # InitialChainKey / InitialHash are these two BLAKE2s digests).
    assert INITIAL_CHAIN == hashlib.blake2s(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").digest()
    assert INITIAL_HASH == hashlib.blake2s(
        INITIAL_CHAIN + b"WireGuard v1 zx2c4 Jason@zx2c4.com").digest()
    assert INITIAL_CHAIN.hex().startswith("60e26daef327efc0")


def test_tai64n_is_monotonic_and_labelled_from_2_62() -> None:
    a, b = tai64n(UNIX_NS), tai64n(UNIX_NS + 30_000_000)
    assert int.from_bytes(a[:8], "big") == (1 << 62) + 10 + UNIX_NS // 10**9
    assert b > a


# -- two devices ------------------------------------------------------------------------------

def _pair(psk_a: bytes | None = None, psk_b: bytes | None = None,
          timings: Timings | None = None) -> tuple[WgDevice, WgDevice]:
    a_key, b_key = generate_private_key(), generate_private_key()
    a = WgDevice(a_key, timings, psk_a, rng=random.Random(1))
    b = WgDevice(b_key, timings, psk_b, rng=random.Random(2))
    a.set_peers([PeerConfig(public_key(b_key), 0, ("10.0.0.2", 51820))])
    b.set_peers([PeerConfig(public_key(a_key), 0, ("10.0.0.1", 51820))])
    return a, b


A_ADDR, B_ADDR = ("10.0.0.1", 51820), ("10.0.0.2", 51820)


def _one(actions: list, kind: type) -> object:
    found = [x for x in actions if isinstance(x, kind)]
    assert len(found) == 1, actions
    return found[0]


def _handshake(a: WgDevice, b: WgDevice, now: float = 1.0) -> tuple[Install, Install]:
    init = _one(a.want_handshake(0, now, UNIX_NS), Send)
    assert isinstance(init, Send) and wg.message_type(init.datagram) == wg.INITIATION
    assert wg.mac1_valid(init.datagram, b.identity.mac1_key)
    b_actions = b.handle(init.datagram, A_ADDR, now, UNIX_NS)
    response = _one(b_actions, Send)
    assert isinstance(response, Send) and wg.message_type(response.datagram) == wg.RESPONSE
    a_actions = a.handle(response.datagram, B_ADDR, now, UNIX_NS)
    a_install, b_install = _one(a_actions, Install), _one(b_actions, Install)
    assert isinstance(a_install, Install) and isinstance(b_install, Install)
    return a_install, b_install


def test_handshake_gives_both_sides_matching_keys() -> None:
    a, b = _pair()
    ai, bi = _handshake(a, b)
    assert ai.keys.initiator and not bi.keys.initiator
    assert ai.keys.send_key == bi.keys.recv_key and ai.keys.recv_key == bi.keys.send_key
    assert ai.keys.local_index == bi.keys.remote_index
    assert ai.keys.remote_index == bi.keys.local_index
    assert ai.keys.send_key != ai.keys.recv_key


def test_preshared_key_mismatch_fails_the_handshake() -> None:
    a, b = _pair(psk_a=b"\x01" * 32, psk_b=b"\x02" * 32)
    init = _one(a.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(init, Send)
    response = _one(b.handle(init.datagram, A_ADDR, 1.0, UNIX_NS), Send)
    assert isinstance(response, Send)
    assert a.handle(response.datagram, B_ADDR, 1.0, UNIX_NS) == []
    assert any("pre-shared" in r for r in a.stats.rejected)


def test_matching_preshared_key_works() -> None:
    a, b = _pair(psk_a=b"\x05" * 32, psk_b=b"\x05" * 32)
    ai, bi = _handshake(a, b)
    assert ai.keys.send_key == bi.keys.recv_key


def test_replayed_initiation_is_refused_and_keeps_the_session() -> None:
    a, b = _pair()
    init = _one(a.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(init, Send)
    assert _one(b.handle(init.datagram, A_ADDR, 1.0, UNIX_NS), Install)
    # the very same bytes later (an attacker replaying it): no new session, no response
    assert b.handle(init.datagram, A_ADDR, 50.0, UNIX_NS) == []
    assert any("replayed" in r for r in b.stats.rejected)


def test_initiation_flood_from_the_real_peer_is_rate_limited() -> None:
    a, b = _pair()
    first = _one(a.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(first, Send)
    b.handle(first.datagram, A_ADDR, 1.0, UNIX_NS)
    peer = next(iter(a.peers.values()))
    body = peer.handshake.create_initiation(99, UNIX_NS + 10**9)
    second = peer.cookies.seal(body, peer.handshake.peer_mac1_key, 1.0)
    assert b.handle(second, A_ADDR, 1.0 + INITIATION_MIN_INTERVAL / 2, UNIX_NS) == []
    assert any("rate" in r for r in b.stats.rejected)


def test_unknown_static_key_gets_no_answer() -> None:
    _, b = _pair()
    stranger = WgDevice(generate_private_key())
    stranger.set_peers([PeerConfig(b.identity.public_key, 0, B_ADDR)])
    init = _one(stranger.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(init, Send)
    assert b.handle(init.datagram, ("10.0.0.9", 51820), 1.0, UNIX_NS) == []


def test_under_load_a_cookie_reply_then_mac2_gets_through() -> None:
    a, b = _pair()
    b.under_load_rate = 0           # everything is "load"
    init = _one(a.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(init, Send)
    reply = _one(b.handle(init.datagram, A_ADDR, 1.0, UNIX_NS), Send)
    assert isinstance(reply, Send) and wg.message_type(reply.datagram) == wg.COOKIE_REPLY
    assert a.handle(reply.datagram, B_ADDR, 1.1, UNIX_NS) == []
    assert a.stats.cookie_replies_received == 1
    # the retry carries MAC2 keyed with that cookie: accepted although still under load
    retry = _one(a.tick(7.0, UNIX_NS + 6 * 10**9, [Activity()]), Send)
    assert isinstance(retry, Send) and retry.datagram[-16:] != bytes(16)
    assert _one(b.handle(retry.datagram, A_ADDR, 7.0, UNIX_NS), Install)
    # a cookie bound to another source address does not help a forger there
    assert wg.message_type(_one(b.handle(retry.datagram, ("10.0.0.66", 4444), 7.5, UNIX_NS),
                                Send).datagram) == wg.COOKIE_REPLY  # type: ignore[attr-defined]


def test_unanswered_initiation_is_retried_then_given_up() -> None:
    t = Timings(rekey_timeout=5.0, rekey_attempt_time=20.0)
    a, _ = _pair(timings=t)
    assert _one(a.want_handshake(0, 0.0, UNIX_NS), Send)
    sent = 1
    now = 0.0
    gave_up: list[float] = []
    while now < 40.0:
        now += 0.5
        actions = a.tick(now, UNIX_NS, [Activity()])
        sent += sum(isinstance(x, Send) for x in actions)
        gave_up += [now for x in actions if isinstance(x, DropStaged) and x.peer == 0]
    # retries every 5-5.33 s while the attempt is younger than 20 s (at ~5, ~10, ~15 s);
    # the one due at ~20 s gives up instead, and nothing follows without new data
    assert sent == 1 + 3, sent
    # giving up drops what the data plane held for the peer, once
    assert len(gave_up) == 1 and 20.0 <= gave_up[0] <= 22.5, gave_up


def test_initiator_rekeys_after_rekey_after_time_when_sending() -> None:
    t = Timings(rekey_after_time=3.0, rekey_timeout=1.0)
    a, b = _pair(timings=t)
    _handshake(a, b, now=1.0)
    busy = Activity(sent_any=3.9, received_any=3.9, sent_data=3.9, received_data=3.9)
    assert not any(isinstance(x, Send) for x in a.tick(3.9, UNIX_NS, [busy]))
    busy.sent_data = 4.1
    assert any(isinstance(x, Send) for x in a.tick(4.1, UNIX_NS, [busy]))
    # the responder never rekeys by time (both would, at once, otherwise)
    assert not any(isinstance(x, Send) for x in b.tick(4.1, UNIX_NS, [busy]))


def test_keepalive_after_received_data_goes_unanswered() -> None:
    a, b = _pair(timings=Timings(keepalive_timeout=10.0))
    _handshake(a, b)
    quiet = Activity(sent_any=2.0, received_any=3.0, sent_data=2.0, received_data=3.0)
    assert not any(isinstance(x, Keepalive) for x in b.tick(12.0, UNIX_NS, [quiet]))
    assert any(isinstance(x, Keepalive) for x in b.tick(13.0, UNIX_NS, [quiet]))


def test_persistent_keepalive_without_a_session_starts_the_handshake() -> None:
    # A peer behind NAT with nothing to send must still come up by itself: its persistent
    # keepalive needs a session, so it initiates one (and keeps trying once per interval).
    t = Timings(persistent_keepalive=25.0, rekey_timeout=5.0, rekey_attempt_time=20.0)
    a, b = _pair(timings=t)
    idle = Activity()
    first = _one(a.tick(0.1, UNIX_NS, [idle]), Send)
    assert isinstance(first, Send) and wg.message_type(first.datagram) == wg.INITIATION
    # unanswered: the ordinary retries (~5, ~10, ~15 s), then given up at ~20 s; the next
    # attempt comes one persistent interval after the last initiation, not on every tick
    initiations = [0.1]
    now = 0.1
    while now < 45.0:
        now = round(now + 0.1, 1)
        if any(isinstance(x, Send) for x in a.tick(now, UNIX_NS, [idle])):
            initiations.append(now)
    assert len(initiations) == 5, initiations
    assert 15.0 <= initiations[3] < 16.1 and 40.0 <= initiations[4] < 41.2, initiations
    # answered: a session, then keepalives (not handshakes) every interval
    retry = a.tick(70.0, UNIX_NS, [idle])
    init = _one(retry, Send)
    assert isinstance(init, Send)
    response = _one(b.handle(init.datagram, A_ADDR, 70.0, UNIX_NS), Send)
    assert isinstance(response, Send)
    actions = a.handle(response.datagram, B_ADDR, 70.0, UNIX_NS)
    assert _one(actions, Install) and _one(actions, Keepalive)
    sent = Activity(sent_any=70.0)
    assert not a.tick(94.0, UNIX_NS, [sent])
    assert [type(x) for x in a.tick(95.0, UNIX_NS, [sent])] == [Keepalive]


def test_no_persistent_keepalive_means_no_handshake_without_data() -> None:
    a, _ = _pair(timings=Timings(persistent_keepalive=0.0))
    assert not any(a.tick(now, UNIX_NS, [Activity()]) for now in (0.1, 30.0, 300.0))


def test_response_moves_the_endpoint_to_its_source() -> None:
    a, b = _pair()
    init = _one(a.want_handshake(0, 1.0, UNIX_NS), Send)
    assert isinstance(init, Send)
    roamed = ("10.0.0.77", 40000)
    actions = b.handle(init.datagram, roamed, 1.0, UNIX_NS)
    endpoint = _one(actions, SetEndpoint)
    assert isinstance(endpoint, SetEndpoint) and endpoint.address == roamed
    assert _one(actions, Send).address == roamed  # type: ignore[attr-defined]


# -- against wireguard-go ---------------------------------------------------------------------

def _echo_request(src: str, dst: str, ident: int) -> bytes:
    icmp = bytearray(b"\x08\x00\x00\x00" + ident.to_bytes(2, "big") + b"\x00\x01" + b"wg" * 16)
    c = checksum(icmp)
    icmp[2:4] = c.to_bytes(2, "big")
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, 1
    header[2:4] = (20 + len(icmp)).to_bytes(2, "big")
    header[12:16], header[16:20] = socket.inet_aton(src), socket.inet_aton(dst)
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header + icmp)


def _recv(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
    sock.settimeout(timeout)
    data, address = sock.recvfrom(65536)
    return data, address


@pytest.fixture
def wg_go_ns(tmp_path: Path):  # type: ignore[no-untyped-def]
    ns = run_prefix("ovd") + "-wg"
    add_netns(ns)
    peers: list[WireguardGoPeer] = []
    try:
        yield ns, peers
    finally:
        for peer in peers:
            peer.stop()
        del_netns(ns)


@netns_required
@pytest.mark.skipif(wireguard_go_unavailable() is not None,
                    reason=f"{wireguard_go_unavailable()}")
@pytest.mark.timeout(60)
def test_full_handshake_and_transport_with_wireguard_go_both_ways(wg_go_ns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns, peers = wg_go_ns
    go_key, our_key = generate_private_key(), generate_private_key()
    device = run_prefix("wg")[-15:]
    go = WireguardGoPeer(ns, device, go_key, 51820, "10.77.0.2/24", tmp_path)
    peers.append(go)
    sock = udp_socket_in_netns(ns, ("127.0.0.1", 0))
    our_port = sock.getsockname()[1]
    go.set_peer(public_key(our_key), "10.77.0.1/32", f"127.0.0.1:{our_port}")
    ours = WgDevice(our_key, rng=random.Random(3))
    ours.set_peers([PeerConfig(public_key(go_key), 0, ("127.0.0.1", 51820))])
    try:
        # 1. we initiate; wireguard-go answers; we send an echo request and get the reply
        init = _one(ours.want_handshake(0, time.monotonic(), time.time_ns()), Send)
        assert isinstance(init, Send)
        sock.sendto(init.datagram, init.address)
        response, source = _recv(sock)
        assert wg.message_type(response) == wg.RESPONSE, response[:4]
        install = _one(ours.handle(response, source, time.monotonic(), time.time_ns()), Install)
        assert isinstance(install, Install)
        keys = install.keys
        sock.sendto(seal_transport(keys.remote_index, 0,
                                   keys.send_key, _echo_request("10.77.0.1", "10.77.0.2", 7)),
                    source)
        reply = b""
        for _ in range(5):
            datagram, _ = _recv(sock)
            receiver, _, plain = open_transport(datagram, keys.recv_key)
            assert receiver == keys.local_index
            if plain:           # skip keepalives
                reply = plain
                break
        assert reply[9] == 1 and reply[20] == 0, reply[:24].hex()      # ICMP echo reply
        assert socket.inet_ntoa(reply[16:20]) == "10.77.0.1"
        assert b64(public_key(our_key)) in go.latest_handshakes()
        assert go.latest_handshakes()[b64(public_key(our_key))] > 0

        # 2. wireguard-go initiates (a ping from its side with no session of its own yet:
        # a fresh wireguard-go peer entry) and we respond
        go.wg("set", device, "peer", b64(public_key(our_key)), "remove")
        go.set_peer(public_key(our_key), "10.77.0.1/32", f"127.0.0.1:{our_port}")
        pinger = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.3",
                                   "-W", "1", "10.77.0.1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            initiation, source = _recv(sock)
            assert wg.message_type(initiation) == wg.INITIATION
            assert wg.mac1_valid(initiation, ours.identity.mac1_key)
            actions = ours.handle(initiation, source, time.monotonic() + 1, time.time_ns())
            install = _one(actions, Install)
            send = _one(actions, Send)
            assert isinstance(install, Install) and isinstance(send, Send)
            sock.sendto(send.datagram, send.address)
            keys = install.keys
            for _ in range(10):
                datagram, _ = _recv(sock)
                if wg.message_type(datagram) != wg.TRANSPORT:
                    continue
                _, _, plain = open_transport(datagram, keys.recv_key)
                if plain:
                    break
            assert plain[9] == 1 and plain[20] == 8, plain[:24].hex()  # its echo request
            assert socket.inet_ntoa(plain[12:16]) == "10.77.0.2"
        finally:
            pinger.kill()
            pinger.wait()
    finally:
        sock.close()

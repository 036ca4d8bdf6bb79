"""The sans-I/O WebSocket core without sockets: C framing, UTF-8, masking, deflate."""

from __future__ import annotations

import os
import random
import zlib

import pytest
from fpy3._native import ffi, lib
from wsraw import close_payload, frame

from fpy3.wsproto.handshake import accept_key
from fpy3.wsproto.protocol import (
    CLOSED,
    CLOSING,
    Deflate,
    ProtocolError,
    WSProtocol,
    negotiate_deflate,
)


def test_accept_key_rfc_example():
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


UTF8_CASES = [
    b"",
    b"plain ascii long enough for the word loop",
    "héllo €uro 𝄞".encode(),
    b"\xed\x9f\xbf",  # U+D7FF, last before the surrogates
    b"\xee\x80\x80",
    b"\xf4\x8f\xbf\xbf",  # U+10FFFF
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\xaf",  # overlong
    b"\xed\xa0\x80",  # surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xff",
    b"\x80",
    b"abc\xe2\x82",  # truncated
    b"12345678\xc3\xa9abcdefgh\xc3",
]


def _py_valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("data", UTF8_CASES)
def test_utf8_matches_python(data):
    assert bool(lib.fpy3_ws_utf8_valid(data, len(data))) == _py_valid(data)


def test_utf8_random_matches_python():
    rng = random.Random(6455)
    alphabet = [b"a", b"\x80", b"\xbf", b"\xc2", b"\xdf", b"\xe0", b"\xed", b"\xef", b"\xf0"]
    alphabet += [b"\xf4", b"\x90", b"\xa0", b"\x9f", b"\x8f", b"\xff", "é".encode(), "€".encode()]
    for _ in range(3000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        assert bool(lib.fpy3_ws_utf8_valid(data, len(data))) == _py_valid(data), data


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000])
@pytest.mark.parametrize("phase", [0, 1, 3])
def test_unmask_matches_python(n, phase):
    data = bytearray(os.urandom(n))
    key = os.urandom(4)
    want = bytes(b ^ key[(i + phase) & 3] for i, b in enumerate(data))
    lib.fpy3_ws_unmask(ffi.from_buffer(data), n, key, phase)
    assert bytes(data) == want


def test_frames_split_at_every_byte():
    wire = frame(1, b"hel", fin=False) + frame(9, b"mid") + frame(0, "lo €".encode())
    wire += frame(2, os.urandom(300))
    for cut in range(len(wire) + 1):
        p = WSProtocol()
        events = p.receive_data(wire[:cut]) + p.receive_data(wire[cut:])
        kinds = [e[0] for e in events]
        assert kinds == ["ping", "text", "bytes"], cut
        assert events[1][1] == "hello €"
        assert p.outgoing == [b"\x8a\x03mid"]


def test_close_handshake_from_client():
    p = WSProtocol()
    assert p.receive_data(frame(8, close_payload(1001, b"bye"))) == [("close", 1001, "bye")]
    assert p.state == CLOSED
    assert p.outgoing == [b"\x88\x02" + close_payload(1001)]
    assert p.close() == b""


def test_close_handshake_from_server():
    p = WSProtocol()
    assert p.close(4000, "x") == b"\x88\x03" + close_payload(4000, b"x")
    assert p.state == CLOSING
    assert p.receive_data(frame(8, close_payload(4000))) == [("close", 4000, "")]
    assert p.state == CLOSED and p.outgoing == []


def test_error_keeps_earlier_messages_and_queues_close():
    p = WSProtocol()
    with pytest.raises(ProtocolError) as info:
        p.receive_data(frame(1, b"ok") + frame(1, b"\xff"))
    assert info.value.code == 1007
    assert p.outgoing == [
        b"\x88"
        + bytes([2 + len(info.value.reason)])
        + close_payload(1007, info.value.reason.encode())
    ]


@pytest.mark.parametrize(
    ("offer", "response"),
    [
        ("permessage-deflate", "permessage-deflate"),
        ("permessage-deflate; client_max_window_bits", "permessage-deflate"),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10",
        ),
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", "permessage-deflate"),
        ("permessage-deflate; unknown_param", None),
        ("x-webkit-deflate-frame", None),
    ],
)
def test_deflate_negotiation(offer, response):
    state, value = negotiate_deflate([(b"sec-websocket-extensions", offer.encode())], 15, 6)
    if response is None:
        assert state is None and value == b""
    else:
        assert value.decode() == response


@pytest.mark.parametrize("reset", [False, True])
def test_deflate_round_trip(reset):
    d = Deflate(12, reset, reset, 6)
    peer = Deflate(12, reset, reset, 6)
    inflater = zlib.decompressobj(-12)
    for i in range(3):
        msg = b"the same words again and again " * 50 + bytes([i])
        wire = d.compress(msg)
        assert len(wire) < len(msg) // 4
        if reset:
            inflater = zlib.decompressobj(-12)
        assert inflater.decompress(wire + b"\x00\x00\xff\xff") == msg
        assert peer.decompress(wire, 0) == msg


def test_compressed_message_through_protocol():
    d = Deflate(15, False, False, 6)
    client = zlib.compressobj(6, zlib.DEFLATED, -15)
    p = WSProtocol(1000, d)
    data = client.compress("ünïcode ".encode() * 10) + client.flush(zlib.Z_SYNC_FLUSH)
    assert p.receive_data(frame(1, data[:-4], rsv=0x40)) == [("text", "ünïcode " * 10)]
    # Too big once inflated.
    big = client.compress(b"\0" * 5000) + client.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ProtocolError) as info:
        p.receive_data(frame(2, big[:-4], rsv=0x40))
    assert info.value.code == 1009


def test_long_close_reason_is_cut_between_characters():
    p = WSProtocol()
    frame_bytes = p.close(1000, "€" * 60)
    assert len(frame_bytes) == 2 + 2 + 123 // 3 * 3
    assert frame_bytes[4:].decode() == "€" * 41


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("deflate_window_bits = 8", "must be between 9 and 15, got 8"),
        ("ping_timeout = 0", "must be greater than 0, got 0.0"),
        ("max_message_size = -1", "must be at least 0, got -1"),
        ("per_message_deflate = 1", "expected a boolean, got an integer"),
    ],
)
def test_websocket_config_errors(tmp_path, line, reason):
    from fpy3.config import ConfigError, load

    path = tmp_path / "fpy3.toml"
    path.write_text(f"[websocket]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value) == f"{path}: websocket.{line.split()[0]}: {reason}"

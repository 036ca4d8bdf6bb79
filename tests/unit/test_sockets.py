"""Binding the listeners: port 0 picks one number for TCP and UDP; errors say where."""

from __future__ import annotations

import dataclasses
import errno
import socket

import pytest
from harness import free_port

from fpy3.config import Settings
from fpy3.sockets import BindError, bind_listeners, bind_picked


def settings(port: int, http3: bool = True) -> Settings:
    s = Settings()
    return dataclasses.replace(
        s,
        server=dataclasses.replace(s.server, host="127.0.0.1", port=port),
        http3=dataclasses.replace(s.http3, enabled=http3),
    )


def test_port_zero_picks_one_port_for_tcp_and_udp():
    # The embedding API's port 0 (server.port 0 elsewhere means no TCP port).
    listeners = bind_picked(settings(0))
    try:
        [tls], [udp] = listeners.tls, listeners.udp
        port = tls.getsockname()[1]
        assert port != 0 and listeners.quic_port == port
        assert udp.getsockname()[1] == port
        assert udp.type == socket.SOCK_DGRAM
    finally:
        listeners.close()


def test_a_taken_port_is_a_bind_error_with_its_errno():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as caught:
            bind_listeners(settings(port))
    assert isinstance(caught.value, OSError)
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value) == (
        f"server.port: cannot listen on 127.0.0.1:{port} (TCP): Address already in use"
    )


def test_a_taken_udp_port_asked_for_is_not_picked_again():
    port = free_port(udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        with pytest.raises(BindError, match=r"\(UDP\)") as caught:
            bind_listeners(settings(port))
        assert caught.value.errno == errno.EADDRINUSE
        # The TCP socket bound first was closed again.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))

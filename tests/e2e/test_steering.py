"""QUIC steering (fpy3/supervisor/steering/): the cBPF program against a model, a real
SO_REUSEPORT group on 127.0.0.1, and real fpy3 workers behind it with aioquic.

Run as a script (``python test_steering.py serve OPTIONS``) this file is the small
master of the last test: it binds, forks workers and reloads on request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import operator
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from harness import client_missing

from fpy3.supervisor.steering.bpf import (
    BPF_MAXINSNS,
    CID_LEN,
    NO_SOCKET,
    SteeringError,
    build_program,
)
from fpy3.supervisor.steering.reuseport import QuicSockets, SteeringUnavailable

HOST = "127.0.0.1"


def _unavailable() -> str | None:
    try:
        QuicSockets.bind(HOST, 0, 2).close()
    except SteeringUnavailable as exc:
        return str(exc)
    return None


UNAVAILABLE = _unavailable()
needs_kernel = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"no SO_REUSEPORT + SO_ATTACH_REUSEPORT_CBPF: {UNAVAILABLE}"
)


# --- QUIC-like datagrams ----------------------------------------------------------------


def cid_of(wid: int) -> bytes:
    return os.urandom(1) + wid.to_bytes(4, "big") + os.urandom(CID_LEN - 5)


def short_packet(dcid: bytes) -> bytes:
    return bytes([0x40 | random.randrange(0x40)]) + dcid + os.urandom(40)


def long_packet(dcid: bytes, kind: int = 2, size: int = 100) -> bytes:
    """kind 0 Initial, 1 0-RTT, 2 Handshake; version 1, an 8-byte SCID, padding."""
    head = bytes([0xC0 | kind << 4]) + b"\0\0\0\1" + bytes([len(dcid)]) + dcid
    head += b"\x08" + os.urandom(8)
    return head + os.urandom(max(0, size - len(head)))


def client_initial(dcid_len: int = 8) -> bytes:
    return long_packet(os.urandom(dcid_len), kind=0, size=1200)


# --- a cBPF interpreter and the model it must agree with --------------------------------


def run_cbpf(prog, pkt: bytes) -> int:
    """The subset of classic BPF the steering program uses, with Linux's semantics."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # ld
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x00:
                a = k
            elif mode == 0x80:
                a = len(pkt)
            elif mode == 0x60:
                a = mem[k]
            else:
                n = {0x00: 4, 0x08: 2, 0x10: 1}[size]
                if k + n > len(pkt):
                    return 0  # an out-of-bounds load ends the program with 0
                a = int.from_bytes(pkt[k : k + n], "big")
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x07:
            assert code == 0x07
            x = a
        elif cls == 0x04:
            src = x if code & 0x08 else k
            alu = {0x00: operator.add, 0x50: operator.and_, 0x90: operator.mod, 0xA0: operator.xor}
            a = alu[code & 0xF0](a, src) & 0xFFFFFFFF
        elif cls == 0x05:
            op = code & 0xF0
            if op == 0x00:
                pc += k
            else:
                taken = {0x10: a == k, 0x20: a > k, 0x30: a >= k, 0x40: bool(a & k)}[op]
                pc += jt if taken else jf
        elif cls == 0x06:
            return a if code & 0x10 else k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def model(pkt: bytes, live, active) -> int:
    """Where a datagram must go, written from the design rather than the code."""
    targets = sorted({w & 0xFFFF for w in (active or live)})
    if not targets:
        return NO_SOCKET

    def u32(i):
        return int.from_bytes(pkt[i : i + 4], "big")

    if not pkt:
        h = 0
    elif pkt[0] & 0x80:
        if len(pkt) < 14:
            h = 0
        else:
            h = u32(6) ^ u32(10)
            if pkt[5] == CID_LEN and u32(7) in live:
                return u32(7) & 0xFFFF
    elif len(pkt) < 1 + CID_LEN:
        h = 0
    else:
        h = u32(1) ^ u32(5)
        if u32(2) in live:
            return u32(2) & 0xFFFF
    return targets[h % len(targets)]


def sample_packets(live, rng: random.Random, n: int = 400):
    live = sorted(live)
    dead = [QuicSockets.worker_id(rng.randrange(2000), 77) for _ in range(5)]
    for _ in range(n):
        kind = rng.randrange(8)
        wid = rng.choice(live) if live and kind < 4 else rng.choice(dead)
        if kind in (0, 4):
            yield short_packet(cid_of(wid))
        elif kind in (1, 5):
            yield long_packet(cid_of(wid), kind=rng.randrange(3))
        elif kind == 2:
            yield client_initial(rng.choice((8, 16, 18, 20)))
        elif kind == 3:
            yield os.urandom(rng.randrange(0, 30))
        elif kind == 6:
            yield long_packet(os.urandom(rng.randrange(0, 21)), kind=0)[: rng.randrange(1, 40)]
        else:
            yield bytes([0x40]) + cid_of(wid)[: rng.randrange(CID_LEN)]


def wids(indexes, generation=1):
    return [QuicSockets.worker_id(i, generation) for i in indexes]


@pytest.mark.parametrize(
    "live, active",
    [
        (wids(range(3)), wids(range(3))),
        (wids(range(4)), wids([0, 2, 3])),  # TTOU of index 1: not contiguous
        (wids(range(3)) + wids(range(3, 6), 2), wids(range(3, 6), 2)),  # reload
        (wids(range(5)), []),  # nothing active: the live ones take new connections
        ([], []),
        (wids(range(0, 900, 3)), wids(range(0, 900, 9))),  # deep search trees
        (wids(range(1500)), wids(range(700, 1500))),
    ],
    ids=["steady", "ttou", "reload", "no-active", "empty", "sparse", "large"],
)
def test_program_agrees_with_model(live, active):
    prog = build_program(live, active)
    assert len(prog) <= BPF_MAXINSNS
    rng = random.Random(len(live) * 1000 + len(active))
    for pkt in sample_packets(live, rng):
        assert run_cbpf(prog, pkt) == model(pkt, set(live), active), pkt.hex()


def test_program_too_large_is_refused():
    with pytest.raises(SteeringError, match="too large"):
        build_program(wids(range(2000)) + wids(range(2000, 2200), 2), wids(range(0, 2000, 2)))


def test_worker_id_encoding():
    wid = QuicSockets.worker_id(5, 3)
    assert wid == 0x30005 and QuicSockets.index_of(wid) == 5
    assert QuicSockets.worker_id(7, 0x10002) == 0x20007  # generations wrap at 16 bits


# --- a real reuseport group --------------------------------------------------------------


class Wire:
    """Client sockets on 127.0.0.1 and a way to see which group socket got a datagram."""

    def __init__(self, group: QuicSockets):
        self.group = group
        family = group.family
        self.clients = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(2)]
        for c in self.clients:
            c.bind((group.address[0], 0))

    def close(self):
        for c in self.clients:
            c.close()

    def deliver(self, payload: bytes, client: int = 0, timeout: float = 5.0) -> int:
        """Send ``payload``; the index of the group socket that receives it."""
        self.clients[client].sendto(payload, self.group.address)
        by_fd = {s.fileno(): i for i, s in enumerate(self.group.sockets)}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                index = by_fd[fd]
                try:
                    data = self.group.sockets[index].recv(65536)
                except BlockingIOError:
                    continue
                if data == payload:
                    return index
        pytest.fail(f"datagram of {len(payload)} bytes not received in {timeout}s")

    def initials(self, n: int = 60) -> list[int]:
        return [self.deliver(client_initial(random.choice((8, 20)))) for _ in range(n)]


@pytest.fixture
def group():
    g = QuicSockets.bind(HOST, 0, 4)
    yield g
    g.close()


@pytest.fixture
def wire(group):
    w = Wire(group)
    yield w
    w.close()


def index(wid: int) -> int:
    return QuicSockets.index_of(wid)


def assert_owned(wire: Wire, wid: int) -> None:
    """Every packet carrying one of ``wid``'s CIDs reaches its socket, from any port."""
    want = index(wid)
    for client in (0, 1):  # a client port change keeps the CID, hence the worker
        assert wire.deliver(short_packet(cid_of(wid)), client) == want
        assert wire.deliver(long_packet(cid_of(wid), kind=2), client) == want
        assert wire.deliver(long_packet(cid_of(wid), kind=0, size=1200), client) == want


@needs_kernel
def test_connection_ids_reach_their_worker(group, wire):
    gen1 = [group.acquire(1) for _ in range(3)]
    group.steer(gen1)
    assert len({group.socket_for(w).fileno() for w in gen1}) == 3
    for wid in gen1:
        assert_owned(wire, wid)


@needs_kernel
def test_initials_hash_over_active_workers(group, wire):
    gen1 = [group.acquire(1) for _ in range(3)]
    group.steer(gen1)
    for _ in range(30):
        pkt = client_initial(random.choice((8, 18, 20)))
        got = wire.deliver(pkt)
        assert got == model(pkt, set(gen1), gen1)
        assert wire.deliver(pkt, client=1) == got  # a retransmit: same worker
    assert set(wire.initials()) == {index(w) for w in gen1}


@needs_kernel
def test_reload_keeps_old_connections_on_old_workers(group, wire):
    gen1 = [group.acquire(1) for _ in range(3)]
    group.steer(gen1)
    gen2 = [group.acquire(2) for _ in range(3)]  # the group grows past 4 sockets
    assert len(group.sockets) == 6
    group.steer(gen2)
    for wid in gen1 + gen2:
        assert_owned(wire, wid)
    assert set(wire.initials()) == {index(w) for w in gen2}

    # An old worker exits: its CIDs go to a new one (which answers a stateless reset).
    gone = gen1[0]
    group.release(gone)
    group.steer(gen2)
    for _ in range(10):
        pkt = short_packet(cid_of(gone))
        assert wire.deliver(pkt) == model(pkt, group.live, gen2)
    # Its socket is free again, for the next generation.
    gen3 = group.acquire(3)
    assert index(gen3) == index(gone)
    group.steer([gen3])
    assert_owned(wire, gen3)
    assert set(wire.initials(20)) == {index(gen3)}


@needs_kernel
def test_ttin_and_ttou_resteer(group, wire):
    workers = [group.acquire(1) for _ in range(2)]
    group.steer(workers)
    workers.append(group.acquire(1))  # TTIN
    group.steer(workers)
    assert set(wire.initials()) == {index(w) for w in workers}

    leaving = workers.pop(1)  # TTOU: no new connections, the old ones stay
    group.steer(workers)
    assert set(wire.initials()) == {index(w) for w in workers}
    assert_owned(wire, leaving)
    group.release(leaving)
    group.steer(workers)
    assert index(leaving) not in wire.initials(20)


@needs_kernel
def test_short_and_unknown_datagrams_reach_an_active_worker(group, wire):
    gen1 = [group.acquire(1) for _ in range(2)]
    group.steer(gen1[1:])
    active = {index(gen1[1])}
    for pkt in (b"\x40", b"\x40" * 10, b"\xc0\0\0\0\1", os.urandom(13)):
        assert wire.deliver(pkt) in active
    stranger = QuicSockets.worker_id(3, 9)  # index of an unused socket, not live
    assert wire.deliver(short_packet(cid_of(stranger))) in active
    assert wire.deliver(long_packet(cid_of(stranger), kind=0, size=1200)) in active


@needs_kernel
def test_freed_socket_is_emptied(group, wire):
    wid = group.acquire(1)
    other = group.acquire(1)
    group.steer([wid, other])
    sock = group.socket_for(wid)
    for _ in range(5):
        wire.clients[0].sendto(short_packet(cid_of(wid)), group.address)
    assert select.select([sock], [], [], 5)[0]
    group.release(wid)  # its worker exited without reading them
    group.steer([other])
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    with pytest.raises(KeyError):
        group.socket_for(wid)
    with pytest.raises(ValueError):
        group.steer([wid])


# --- MsQuic: the workers' own sockets in the master's group ------------------------------


class SocketOwner:
    """A process with one SO_REUSEPORT socket on ``port``, as a MsQuic worker has."""

    SCRIPT = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2])))\n"
        "print(s.fileno(), flush=True)\n"
        "sys.stdin.read()\n"
    )

    def __init__(self, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, HOST, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        fd = int(self.proc.stdout.readline())
        self.inode = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")

    def exit(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def msquic_cid(wid: int) -> bytes:
    return os.urandom(1) + wid.to_bytes(4, "big") + os.urandom(9)  # MsQuic's 14 bytes


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd_open")
def test_msquic_group_gives_places_of_gone_workers_to_new_ones(tmp_path):
    from fpy3.h3.engine import udp_inodes
    from fpy3.supervisor.steering.msquic_group import MsQuicGroup

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    group = MsQuicGroup(port, str(tmp_path))
    owners: dict[int, SocketOwner] = {}
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((HOST, 0))

    def join() -> int:
        with open(group.id_path) as f:
            wid = int(f.read())
        owner = SocketOwner(port)
        group.adopt(owner.proc.pid, wid)
        owners[wid] = owner
        return wid

    def leave(wid: int) -> None:
        owners.pop(wid).exit()
        group.release(wid)
        group.tidy()

    def assert_steered(active: list[int]) -> None:
        """Each live id's packets reach the very socket of the worker holding it."""
        group.steer(active)
        for wid, owner in owners.items():
            client.sendto(short_packet(msquic_cid(wid)), (HOST, port))
            readable = select.select(group.sockets, [], [], 5)[0]
            assert len(readable) == 1, hex(wid)
            readable[0].recv(2048)
            inode = f"socket:[{os.fstat(readable[0].fileno()).st_ino}]"
            assert inode == owner.inode, (hex(wid), group.sockets.index(readable[0]))

    try:
        gen1 = [join(), join()]
        assert [w & 0xFFFF for w in gen1] == [0, 1]
        assert_steered(gen1)
        gen2 = [join(), join()]  # a reload: both generations for a while
        assert [w & 0xFFFF for w in gen2] == [2, 3]
        assert_steered(gen2)
        for wid in gen1:
            leave(wid)  # in front of gen2's: their places wait for the next join
        assert len(group.sockets) == 4
        assert_steered(gen2)
        gen3 = [join(), join()]  # each lands at the end, then moves into a gone place
        assert [w & 0xFFFF for w in gen3] == [0, 1] and not set(gen3) & set(gen1)
        assert_steered(gen3)
        with open(group.lock_path) as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # a join under way: nothing may leave
            for wid in gen2:
                leave(wid)
            assert len(group.sockets) == 4
        group.tidy()  # the next round: the gone end of the group leaves
        assert len(group.sockets) == 2 and len(udp_inodes(port)) == 2
        assert_steered(gen3)
        with open(group.id_path) as f:
            assert int(f.read()) & 0xFFFF == 2
    finally:
        for owner in owners.values():
            owner.exit()
        client.close()
        group.close()


@needs_kernel
def test_take_over_a_bound_socket():
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind((HOST, 0))
    address = plain.getsockname()
    g = QuicSockets.take_over(plain, 2)
    try:
        assert plain.fileno() == -1 and g.address == address
        w = Wire(g)
        try:
            wid = g.acquire(1)
            g.steer([wid])
            assert w.deliver(short_packet(cid_of(wid))) == index(wid)
        finally:
            w.close()
    finally:
        g.close()


@needs_kernel
def test_ipv6_group():
    try:
        g = QuicSockets.bind("::1", 0, 3)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    w = Wire(g)
    try:
        ids = [g.acquire(1) for _ in range(3)]
        g.steer(ids)
        for wid in ids:
            assert_owned(w, wid)
        assert set(w.initials()) == {index(x) for x in ids}
    finally:
        w.close()
        g.close()


# --- real workers: the engine's connection ids, aioquic clients, a reload --------------


class MiniMaster:
    """This file run as ``serve``: a subprocess that binds, forks and reloads."""

    def __init__(self, tmp_path, workers: int):
        from harness import clean_env, free_port

        self.port = free_port(HOST, udp=True)
        self.state = tmp_path / "state"
        opts = {"port": self.port, "state_dir": str(self.state), "workers": workers}
        self.stderr = open(tmp_path / "master.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", json.dumps(opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=clean_env({"FPY3_TEST_SHARED": str(tmp_path)}),
        )
        self.cafile = str(self.state / "dev-cert.pem")

    def expect(self, word: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], deadline - time.monotonic())[0]:
                line = self.proc.stdout.readline().decode()
                if not line:
                    break
                head, _, rest = line.partition(" ")
                if head == word:
                    return json.loads(rest)
        self.stderr.seek(0)
        pytest.fail(f"mini master: no {word!r}:\n{self.stderr.read().decode()[-3000:]}")

    def command(self, cmd: str, reply: str, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(reply, timeout)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                return self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()
        return self.proc.returncode


def pids_of(responses) -> set[int]:
    assert all(r.status == 200 for r in responses), [r.status for r in responses]
    return {int(r.body) for r in responses}


@needs_kernel
def test_workers_share_http3_through_steering(tmp_path):
    import h3clients as kit

    try:
        kit._aioquic()
    except kit.ClientUnavailable as exc:
        client_missing(exc)
    master = MiniMaster(tmp_path, workers=3)
    try:
        gen1 = set(master.expect("ready")["pids"])
        port, ca = master.port, master.cafile
        many = [("GET", "/pid", b"")] * 32
        served = pids_of(kit.aioquic_many(HOST, port, many, ca, connections=16, timeout=30))
        assert served <= gen1 and len(served) >= 2

        # One connection lives across a reload: its stream keeps sending to the old
        # worker (now draining) while new connections go to the new generation.
        authority = f"{HOST}:{port}"
        body = os.urandom(3000)

        async def across_reload():
            async with kit._h3_connection(HOST, port, ca, 30) as proto:
                ex = await kit._send_request(proto, "GET", "/pid", authority, (), b"")
                owner = int((await kit._finish(proto, ex)).body)
                proto.change_connection_id()  # another CID the worker issued
                ex = proto.new_request()
                headers = kit._request_headers(
                    "POST", "/echo", authority, [("content-length", str(len(body)))]
                )
                proto.h3.send_headers(ex.stream_id, headers)
                proto.h3.send_data(ex.stream_id, body[:1000], end_stream=False)
                proto.transmit()
                await proto.ping()
                gen2 = set((await asyncio.to_thread(master.command, "reload", "reloaded"))["pids"])
                # Only the worker holding the connection can echo what is sent now (the
                # draining worker may close the connection right after, so no PING here).
                proto.h3.send_data(ex.stream_id, body[1000:], end_stream=True)
                proto.transmit()
                return owner, gen2, await kit._finish(proto, ex)

        owner, gen2, echoed = asyncio.run(asyncio.wait_for(across_reload(), 60))
        assert owner in gen1
        assert echoed.status == 200 and echoed.body == body
        served = pids_of(kit.aioquic_many(HOST, port, many, ca, connections=16, timeout=30))
        assert served <= gen2 and len(served) >= 2
    finally:
        code = master.stop()
    assert code == 0


def _serve(opts: dict) -> int:
    """The mini master: bind, fork ``workers`` fpy3 workers, reload on "reload"."""
    from fpy3 import config, worker
    from fpy3.bootstrap import prepare
    from fpy3.keys import SessionKeys

    support_dir = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support"
    )
    settings = config.load(
        None,
        env={},
        overrides={
            "server.app": "apps:app",
            "server.app_dir": support_dir,
            "server.host": HOST,
            "server.port": opts["port"],
            "server.state_dir": opts["state_dir"],
            "http3.enabled": True,
            "http3.engine": "ngtcp2",  # steering is ngtcp2's (MsQuic binds its own sockets)
            "workers.drain_timeout": 20.0,
        },
    )
    settings, listeners = prepare(settings)
    group = QuicSockets.take_over(listeners.udp[0], opts["workers"])
    listeners = dataclasses.replace(listeners, udp=[])
    secret = SessionKeys(os.urandom(64))  # reset, token and ticket keys of every worker
    workers: dict[int, int] = {}  # pid -> worker id
    pipes: dict[int, int] = {}  # pid -> its ready/beat pipe, open while it lives

    def spawn(generation: int) -> tuple[int, int]:
        wid = group.acquire(generation)
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                os.dup2(2, 1)  # stdout is this master's line protocol: keep access logs off it
                own = dataclasses.replace(listeners, udp=[group.for_worker(wid)])
                code = worker.run(settings, own, ready_w, wid, secret)
            finally:
                os._exit(code)
        os.close(ready_w)
        workers[pid] = wid
        pipes[pid] = ready_r
        return pid, ready_r

    def generation(number: int) -> list[int]:
        started = [spawn(number) for _ in range(opts["workers"])]
        for _pid, fd in started:
            said = b""  # beats come first; the pipe stays open (closed means "master gone")
            while b"ready" not in said:
                if not select.select([fd], [], [], 60)[0] or not (chunk := os.read(fd, 4096)):
                    raise RuntimeError("a worker did not become ready")
                said += chunk
        pids = [pid for pid, _ in started]
        group.steer([workers[p] for p in pids])
        return pids

    current = generation(1)
    print("ready", json.dumps({"pids": current}), flush=True)
    number = 1
    for line in sys.stdin:
        if line.strip() == "reload":
            number += 1
            old, current = current, generation(number)
            for pid in old:
                os.kill(pid, signal.SIGTERM)  # drain; their ids stay live until reaped
            print("reloaded", json.dumps({"pids": current}), flush=True)
        elif line.strip() == "quit":
            break
        while workers:  # reap: an exited worker's socket goes back to the pool
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            group.release(workers.pop(pid))
            os.close(pipes.pop(pid))
            group.steer([workers[p] for p in current if p in workers])
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    failed = 0
    for pid in workers:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    group.close()
    return 1 if failed else 0


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.exit(_serve(json.loads(sys.argv[2])))

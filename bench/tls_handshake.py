"""What the TLS-over-TCP hooks cost per handshake (fpy3/ossl.py: the shared ticket keys
and the per-handshake context choice), measured in process: full and resumed TLS 1.3
handshakes between two memory BIOs, with Python's plain server context and with
fpy3's (``TLSContexts``).

    .venv/bin/python bench/tls_handshake.py [N]
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import time

from fpy3 import config, devcert, keys, tls


def handshake(server_ctx, client_ctx, session=None):
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    while not (done_c and done_s):
        for obj, done in ((client, done_c), (server, done_s)):
            if not done:
                try:
                    obj.do_handshake()
                    if obj is client:
                        done_c = True
                    else:
                        done_s = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    # Tickets come after the handshake: let the client read them.
    server.write(b"x")
    c_in.write(s_out.read())
    client.read(1)
    return client.session, client.session_reused


def run(name: str, server_ctx, client_ctx, n: int) -> None:
    session, _ = handshake(server_ctx, client_ctx)
    t = time.perf_counter()
    for _ in range(n):
        handshake(server_ctx, client_ctx)
    full = (time.perf_counter() - t) / n
    t = time.perf_counter()
    resumed = 0
    for _ in range(n):
        session, reused = handshake(server_ctx, client_ctx, session)
        resumed += reused
    res = (time.perf_counter() - t) / n
    print(f"{name:28s} full {full * 1e6:8.1f} us   resumed {res * 1e6:8.1f} us  ({resumed}/{n})")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as d:
        cert, key = devcert.ensure_dev_cert(d)
        settings = config.Settings(
            server=config.ServerSettings(state_dir=d), tls=config.TLSSettings(cert=cert, key=key)
        )
        client = ssl.create_default_context(cafile=cert)
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        plain = tls.server_context(settings)
        hooked = tls.TLSContexts(settings, keys.load_or_create(os.path.join(d, "k"))).listener
        for _ in range(2):
            run("python ssl (per-context keys)", plain, client, n)
            run("fpy3 TLSContexts (hooks)", hooked, client, n)


if __name__ == "__main__":
    main()

"""QUIC packet steering: each connection's datagrams reach the worker that owns it.

A worker puts its *worker id* in the server connection ids it issues. The master
keeps every worker's UDP socket in one SO_REUSEPORT group on the HTTP/3 port and
attaches a classic BPF program to the group (SO_ATTACH_REUSEPORT_CBPF): for every
datagram the kernel runs it on the UDP payload and delivers the datagram to the
socket whose index in the group it returns.

- ``bpf``: the program, built from the live and the active worker ids.
- ``reuseport``: ngtcp2 workers. The master binds the group and hands each new
  worker a socket of it (``QuicSockets``).
- ``msquic_group``: MsQuic workers bind their own socket; they join the master's
  group one worker at a time and the master keeps copies (``MsQuicGroup``).

Group membership is by index in join order, and the kernel moves the last socket into
the hole when one leaves, so the master holds every socket and decides when one may
leave: a free one is reused (ngtcp2) or given to the next worker that joins (MsQuic).
"""

"""The master process, ``fpy3-master``, by job (as in gunicorn).

- ``arbiter``: the loop that acts on queued signals and worker messages: spawning,
  reaping, heartbeats, recycling, reload generations, stop; and ``main``.
- ``workers``: a worker process as the master sees it, its fork and its pipe protocol.
- ``steering``: HTTP/3 packets to the worker that owns their connection.
- ``systemd``, ``pidfile``, ``privileges``, ``reloader``: notify, the pidfile, the
  workers' user, ``--reload``.

Modules here import only those below them: none of them imports ``arbiter``.
"""

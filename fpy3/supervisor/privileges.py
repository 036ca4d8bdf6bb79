"""Who the workers run as.

As root, the master binds the sockets (ports below 1024 too) and each worker switches
to ``server.user`` / ``server.group`` right after the fork, so the app never has the
privileges the sockets were bound with.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from typing import NamedTuple

from fpy3 import config

logger = logging.getLogger("fpy3.error")


class UserIds(NamedTuple):
    uid: int
    gid: int
    user: str  # for the supplementary groups


def resolve_ids(settings: config.Settings) -> UserIds | None:
    """The ids for server.user / server.group, or None to stay as we are.

    Raises ValueError naming the setting when the user or group does not exist."""
    server = settings.server
    if not server.user and not server.group:
        return None
    try:
        entry = pwd.getpwnam(server.user) if server.user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ValueError(f"server.user: no such user: {server.user!r}") from None
    try:
        gid = grp.getgrnam(server.group).gr_gid if server.group else entry.pw_gid
    except KeyError:
        raise ValueError(f"server.group: no such group: {server.group!r}") from None
    if os.geteuid() != 0:
        if (entry.pw_uid, gid) != (os.getuid(), os.getgid()):
            logger.warning("server.user/group ignored: the master is not running as root")
        return None
    return UserIds(entry.pw_uid, gid, entry.pw_name)


def drop_privileges(ids: UserIds) -> None:
    """In a worker, after the sockets are bound: groups first, the uid last."""
    os.initgroups(ids.user, ids.gid)
    os.setgid(ids.gid)
    os.setuid(ids.uid)

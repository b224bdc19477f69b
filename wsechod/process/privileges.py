"""Who the daemon runs as: resolve --user/--group early, drop root after binding.

Binding a low port and creating the pidfile directory need root; serving does not. So the
sockets are bound and the directory is made (and handed to the user) first, then the
process takes the user's uid, gid and supplementary groups, and keeps nothing of root's.
"""

import grp
import os
import pwd
from dataclasses import dataclass

from daemon.daemon import change_process_owner

from wsechod.settings import Settings, SettingsError


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    uid: int
    gid: int

    def set_groups(self) -> None:
        """The user's supplementary groups instead of root's (needs root)."""
        os.initgroups(self.name, self.gid)

    def drop(self) -> None:
        """Become this user for good: groups, then gid, then uid."""
        self.set_groups()
        change_process_owner(self.uid, self.gid)


def resolve(settings: Settings) -> Identity | None:
    """The identity to switch to, or None to stay as we are."""
    if not settings.user and not settings.group:
        return None
    if settings.user:
        try:
            entry = pwd.getpwnam(settings.user)
        except KeyError:
            raise SettingsError(f"invalid user {settings.user!r}: no such user") from None
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    else:
        entry = pwd.getpwuid(os.getuid())
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    if settings.group:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            raise SettingsError(f"invalid group {settings.group!r}: no such group") from None
    if (uid, gid) == (os.geteuid(), os.getegid()) and os.geteuid() != 0:
        return None  # already that user: nothing to switch (and no root to do it)
    if os.geteuid() != 0:
        raise SettingsError(
            f"invalid user {settings.user!r}/group {settings.group!r}: "
            "switching identity needs root"
        )
    return Identity(name, uid, gid)


def socket_owner(
    settings: Settings, identity: Identity | None, source: str = "default"
) -> tuple[int, int] | None:
    """Who owns the unix socket files: ``unix_socket_owner`` ("user[:group]", ":group"),
    else the identity the server runs as; None: whoever starts it (nothing to change)."""
    owner = settings.unix_socket_owner
    if not owner:
        return None if identity is None else (identity.uid, identity.gid)
    name, _, group = owner.partition(":")
    uid, gid = (os.getuid(), os.getgid()) if identity is None else (identity.uid, identity.gid)
    try:
        if name:
            what = "user"
            entry = pwd.getpwnam(name)
            uid, gid = entry.pw_uid, entry.pw_gid
        if group:
            what = "group"
            gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SettingsError(
            f"invalid unix_socket_owner {owner!r} (from {source}): no such {what}"
        ) from None
    return uid, gid


def describe_owner(uid: int, gid: int) -> str:
    """``user:group`` by name where the names are known, else by number."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"

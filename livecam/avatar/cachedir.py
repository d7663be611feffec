"""A named cache folder replaced atomically: versioned folders and a symlink pointer.

ROOT/NAME is a symlink to ROOT/.NAME~v-XXXX. A writer fills a fresh version folder, then
swaps the pointer with one rename, so a reader sees the old cache or the new one, never a
mix or nothing, even if the writer is killed. Writers take ROOT/.NAME~lock (flock) first, so
concurrent ones queue; each cleans what killed writers left behind. Hidden entries are never
listed. A pointer is only followed to a version folder of its own name in ROOT: a symlink
planted elsewhere is never read through and never deleted through. A plain folder NAME (the
layout before versions) is still read, and exchanged for a pointer on the next write
(renameat2 RENAME_EXCHANGE: there is no moment without NAME).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

SEP = "~"  # never in a name (see store._NAME_RE): .NAME~... belongs to NAME alone


def _version_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}{SEP}v-[a-z0-9_]+")


def _old_leftover_re(name: str) -> re.Pattern[str]:
    """What the writer before versions left when killed: .NAME.tmp-XXXXXXXX, .NAME.old-PID."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp-[a-z0-9_]{{8}}|old-\d+)")


def live_dir(root: Path, name: str) -> Path | None:
    """The folder NAME's cache is in now, or None (no cache, or a pointer out of ROOT)."""
    link = root / name
    try:
        st = link.lstat()
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return link  # the older layout: a plain folder
    if not stat.S_ISLNK(st.st_mode):
        return None
    target = os.readlink(link)
    if not _version_re(name).fullmatch(target):
        return None
    path = root / target
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(path.lstat().st_mode):
            return path
    return None


def names(root: Path) -> list[str]:
    """Entries of ROOT that may be caches (hidden leftovers and locks excluded)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


@contextlib.contextmanager
def locked(root: Path, name: str) -> Iterator[None]:
    """Hold NAME's writer lock (waiting for another writer to finish)."""
    root.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root / f".{name}{SEP}lock", flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_version(root: Path, name: str) -> Path:
    """An empty version folder to fill (call under `locked`)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}{SEP}v-", dir=root))


def publish(root: Path, name: str, version: Path) -> None:
    """Point NAME at `version` in one rename, then remove every other version and leftover
    (call under `locked`)."""
    link = root / name
    try:
        is_folder = stat.S_ISDIR(link.lstat().st_mode)
    except FileNotFoundError:
        is_folder = False
    tmp_link = root / f".{name}{SEP}link-{uuid.uuid4().hex[:8]}"
    os.symlink(version.name, tmp_link)
    try:
        if is_folder:  # the older layout: tmp_link becomes the folder, removed below
            _exchange(tmp_link, link)
        else:
            os.replace(tmp_link, link)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        raise
    clean(root, name, keep=version.name)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> None:
    """Swap two names in one step; where the filesystem cannot, b is moved aside first."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is not None:
        if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(b))
    aside = b.parent / f".{b.name}{SEP}old-{uuid.uuid4().hex[:8]}"
    b.rename(aside)
    try:
        os.replace(a, b)
    except BaseException:
        aside.rename(b)
        raise


def clean(root: Path, name: str, keep: str | None = None) -> None:
    """Remove NAME's versions other than `keep` and anything killed writers left (call under
    `locked`). Symlinks are unlinked, never followed."""
    own, old = f".{name}{SEP}", _old_leftover_re(name)
    for path in root.iterdir():
        if path.name in (keep, f".{name}{SEP}lock"):
            continue
        if path.name.startswith(own) or old.fullmatch(path.name):
            remove(path)


def discard(root: Path, name: str) -> None:
    """Remove NAME's pointer (or older-layout folder) and all its versions (under `locked`)."""
    remove(root / name)
    clean(root, name)


def remove(path: Path) -> None:
    """Delete a folder tree, or only the link if `path` is a symlink."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

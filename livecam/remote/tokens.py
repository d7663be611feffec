"""The shared secret between `livecam serve` and its clients: one line in a private file."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MIN_TOKEN = 16
MAX_TOKEN = 1024


class TokenError(Exception):
    """A token file that cannot be used, with a message fit for the user."""


def read_token(path: Path, *, create: bool = False) -> str:
    """The token in `path`; with `create`, a missing file gets a new random token (0600)."""
    if create and not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
        except OSError as exc:
            raise TokenError(f"cannot create the token file {path}: {exc.strerror}") from None
        return token
    try:
        token = path.read_text(errors="strict")[: MAX_TOKEN + 2].strip()
    except FileNotFoundError:
        raise TokenError(
            f"token file {path} not found: copy the one `livecam serve "
            "--token-file` created on the server"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the token file {path}: {exc}") from None
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN or any(c.isspace() for c in token):
        raise TokenError(
            f"the token in {path} must be one line of {MIN_TOKEN} to "
            f"{MAX_TOKEN} characters without spaces"
        )
    if problem := exposed(path):
        log.warning("%s", problem)
    return token


def exposed(path: Path) -> str | None:
    """What is wrong where other users can read the token file (anyone who has the token may
    use the pool), with the fix; None where only its owner can."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            return (f"the token file {path} can be read by other users (mode {mode:04o}): "
                    f"chmod 600 {path}")  # fmt: skip
    return None

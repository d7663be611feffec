"""`livecam doctor`'s check of the remote pool `livecam start --remote` would use: it is
reached, takes the token and says which engine it runs (what `start` would otherwise find out
only by falling back to local frames)."""

from __future__ import annotations

import time
from pathlib import Path

from livecam.doctor.check import Check


def remote_check(url: str, token_file: Path | None) -> Check:
    from livecam.remote.client import Link, RemoteError, RemoteRefused
    from livecam.remote.tokens import TokenError, read_token

    name = "remote pool"
    if token_file is None:
        return Check(name, False, f"{url}: --token-file FILE is needed (the server's token)")
    try:
        link = Link(url, read_token(token_file), fps=30.0, idle=True, connections=1)
    except (RemoteError, TokenError) as exc:  # the address or the token file
        return Check(name, False, str(exc))
    t0 = time.perf_counter()
    try:
        link.connect()
    except RemoteRefused as exc:  # the token, the protocol version
        return Check(name, False, str(exc))
    except RemoteError as exc:
        return Check(name, False, f"{exc} (is `livecam serve` running there, or the tunnel?)")
    seconds = time.perf_counter() - t0
    server = link.server
    link.close()
    assert server is not None  # connect() set it
    return Check(name, True, f"{url}: {server.name} ({', '.join(server.tiers)}), token taken, "
                 f"answered in {seconds * 1e3:.0f} ms")  # fmt: skip

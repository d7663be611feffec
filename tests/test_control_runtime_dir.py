"""A runtime directory that cannot hold the control socket: one clear line, no traceback."""

import errno
import os
import socket
import subprocess
import sys

import pytest

from livecam.control import ControlError, ControlServer


def _start_error(path) -> str:
    server = ControlServer({}, path)
    with pytest.raises(ControlError) as caught:
        server.start()
    return str(caught.value)


def test_too_long_path_names_the_directory_and_the_fix(tmp_path):
    deep = tmp_path / ("d" * 120)
    message = _start_error(deep / "livecam.sock")
    assert str(deep) in message and "longer than the 107 bytes" in message
    assert "LIVECAM_RUNTIME_DIR" in message and "\n" not in message


@pytest.mark.parametrize(
    ("code", "why"),
    [(errno.EROFS, "read-only filesystem"), (errno.ENXIO, "does not support Unix sockets")],
)
def test_bind_refused_by_the_filesystem(tmp_path, monkeypatch, code, why):
    # root ignores permission bits and only a privileged mount makes a directory read-only or
    # 9p, so the kernel's answer to bind() is reproduced here; errno 6 is what 9p gives
    def refuse(self, address):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(socket.socket, "bind", refuse)
    message = _start_error(tmp_path / "livecam.sock")
    assert why in message and str(tmp_path) in message
    assert not (tmp_path / "livecam.sock").exists()


def test_runtime_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    message = _start_error(blocker / "run" / "livecam.sock")
    assert str(blocker / "run") in message and "LIVECAM_RUNTIME_DIR" in message


def test_start_prints_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "LIVECAM_RUNTIME_DIR": str(tmp_path / ("r" * 120))}
    proc = subprocess.run(
        [sys.executable, "-m", "livecam", "start", "--sink", "memory", "--duration", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "cannot create the control socket" in proc.stderr + proc.stdout

"""`livecam doctor`'s camera checks against a fake /sys tree and device nodes with real modes."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from livecam.doctor.camera import (
    RELOAD,
    User,
    camera_findings,
    loopback_nodes,
    module_findings,
    write_problem,
)


def fake_sys(root: Path, exclusive_caps: str = "Y,N,N,N,N,N,N,N", label: str = "LiveCam") -> Path:
    params = root / "module" / "v4l2loopback" / "parameters"
    params.mkdir(parents=True)
    (params / "exclusive_caps").write_text(exclusive_caps + "\n")
    (params / "video_nr").write_text("10,-1,-1,-1,-1,-1,-1,-1\n")
    node = root / "devices" / "virtual" / "video4linux" / "video10"
    node.mkdir(parents=True)
    (node / "name").write_text(label + "\n")
    return root


def test_module_options_and_the_device_label(tmp_path):
    root = fake_sys(tmp_path)
    (module,) = module_findings(root)
    assert module.ok and "exclusive_caps=Y" in module.detail and "video_nr=10" in module.detail
    assert loopback_nodes(root) == {"/dev/video10": "LiveCam"}


def test_exclusive_caps_off_names_the_reload(tmp_path):
    root = fake_sys(tmp_path, exclusive_caps="N,N,N,N,N,N,N,N")
    module, caps = module_findings(root)
    assert module.ok and not caps.ok and RELOAD in caps.detail and "Chrome" in caps.detail


def test_module_not_loaded(tmp_path):
    (found,) = camera_findings(tmp_path)
    assert not found.ok and not found.required and "modprobe v4l2loopback" in found.detail


@pytest.fixture
def node(tmp_path) -> tuple[Path, int]:
    """A stand-in device node: group `video` (gid of any group here), mode 0660."""
    path = tmp_path / "video10"
    path.write_bytes(b"")
    gid = grp.getgrnam("video").gr_gid if _has_group("video") else os.getgid()
    os.chown(path, 0, gid)
    path.chmod(0o660)
    return path, gid


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_user_outside_the_group_gets_the_usermod_fix(node):
    path, gid = node
    outsider = User("alice", 4242, frozenset({4242}))
    problem = write_problem(str(path), outsider)
    group = grp.getgrgid(gid).gr_name
    assert problem is not None and f"group {group}, mode 0660" in problem
    assert f"sudo usermod -aG {group} alice" in problem and "log out and in again" in problem
    assert write_problem(str(path), User("bob", 4243, frozenset({4243, gid}))) is None
    assert write_problem(str(path), User("root", 0, frozenset({0}))) is None


def test_no_group_may_write(node):
    path, _ = node
    path.chmod(0o600)
    problem = write_problem(str(path), User("alice", 4242, frozenset({4242})))
    assert problem is not None and f"sudo chgrp video {path} && sudo chmod g+rw {path}" in problem


def test_member_in_etc_group_but_not_in_this_session(node, monkeypatch):
    path, gid = node
    real = grp.getgrgid(gid)
    with_alice = type(real)((real.gr_name, real.gr_passwd, real.gr_gid, ["alice"]))
    monkeypatch.setattr(grp, "getgrgid", lambda g: with_alice)
    problem = write_problem(str(path), User("alice", 4242, frozenset({4242})))
    assert problem is not None and "after this login" in problem and "newgrp" in problem

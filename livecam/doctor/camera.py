"""What `livecam doctor` checks about the virtual camera: the v4l2loopback module and its
options, the device nodes, and whether this user may write them (with the exact fix)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from livecam.doctor.check import Check
from livecam.sinks.virtualcam import APT_INSTALL, MODPROBE, USERMOD, device_holders

RELOAD = f"sudo modprobe -r v4l2loopback && {MODPROBE}"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    groups: frozenset[int]  # the groups this login session has (not /etc/group's list)


def current_user() -> User:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return User(name, uid, frozenset([os.getgid(), *os.getgroups()]))


def module_findings(sys_root: Path = Path("/sys")) -> list[Check]:
    module = sys_root / "module" / "v4l2loopback"
    if not module.is_dir():
        installed = any(Path("/lib/modules", os.uname().release).rglob("v4l2loopback.ko*"))
        fix = f"`{MODPROBE}`" if installed else f"`{APT_INSTALL}`, then `{MODPROBE}`"
        return [Check("virtual camera", False, f"v4l2loopback is not loaded: {fix}",
                      required=False)]  # fmt: skip
    params = {}
    for name in ("exclusive_caps", "video_nr"):
        path = module / "parameters" / name
        params[name] = path.read_text().strip() if path.exists() else "?"
    loaded = f"exclusive_caps={params['exclusive_caps']}, video_nr={params['video_nr']}"
    found = [Check("virtual camera", True, f"v4l2loopback loaded ({loaded})")]
    nodes = loopback_nodes(sys_root)
    caps = params["exclusive_caps"].split(",")[: max(len(nodes), 1)]
    if "N" in caps or "0" in caps:
        found.append(Check("exclusive_caps", False, "off: Chrome, Zoom and Teams will not list "
                             f"the camera; reload the module with `{RELOAD}`"))  # fmt: skip
    return found


def loopback_nodes(sys_root: Path = Path("/sys")) -> dict[str, str]:
    """/dev node -> card label of every v4l2loopback device."""
    found = {}
    for entry in sorted((sys_root / "devices" / "virtual" / "video4linux").glob("video*")):
        label = entry / "name"
        found[f"/dev/{entry.name}"] = label.read_text().strip() if label.exists() else "?"
    return found


def write_problem(device: str, user: User) -> str | None:
    """None if `user` may write `device`, else what stops it and the exact fix."""
    st = os.stat(device)
    mode = stat.S_IMODE(st.st_mode)
    if (
        user.uid == 0
        or (st.st_uid == user.uid and mode & stat.S_IWUSR)
        or (st.st_gid in user.groups and mode & stat.S_IWGRP)
        or mode & stat.S_IWOTH
    ):
        return None  # fmt: skip
    try:
        group = grp.getgrgid(st.st_gid)
        group_name, members = group.gr_name, group.gr_mem
    except KeyError:
        group_name, members = str(st.st_gid), []
    where = f"{device} is group {group_name}, mode {mode:04o}"
    if not mode & stat.S_IWGRP:
        return (f"{where}, writable by no group: `sudo chgrp video {device} && sudo chmod "
                f"g+rw {device}` (until reboot; for good, a udev rule "
                f'KERNEL=="video[0-9]*", GROUP="video", MODE="0660")')  # fmt: skip
    if user.name in members:
        return (f"{where}; {user.name} was added to {group_name} after this login: log out "
                f"and in again (or run `newgrp {group_name}`)")  # fmt: skip
    fix = USERMOD.replace("video", group_name).replace("$USER", user.name)
    return f"{where} and {user.name} is not in it: `{fix}`, then log out and in again"


def device_findings(nodes: dict[str, str], user: User) -> list[Check]:
    found = []
    for device, label in nodes.items():
        if not os.path.exists(device):
            found.append(Check("camera device", False, f"{device} ({label}) is in sysfs but "
                                 "has no /dev node: is udev running?"))  # fmt: skip
            continue
        problem = write_problem(device, user)
        holders = device_holders(device)
        busy = f"; open in {', '.join(holders)}" if holders else ""
        found.append(Check("camera device", problem is None,
                             problem or f"{device} ({label}), writable{busy}"))  # fmt: skip
    return found


def camera_findings(sys_root: Path = Path("/sys"), user: User | None = None) -> list[Check]:
    found = module_findings(sys_root)
    if found[0].ok:
        nodes = loopback_nodes(sys_root)
        if not nodes:
            found.append(Check("camera device", False, f"the module made no device: `{RELOAD}`"))
        found += device_findings(nodes, user or current_user())
    return found

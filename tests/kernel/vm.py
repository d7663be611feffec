"""Boots Debian's kernel (with v4l2loopback, or with netem and a NIC) in a qemu guest through
virtme-ng (the host's root filesystem, read-only, so the guest runs this checkout, its venv and
ffmpeg), runs a command there and leaves its files in a host directory shared read-write
(--rwdir)."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# What .ci/run installs (apt) for these tests; named in every "missing" message.
APT_PACKAGES = ("linux-image-amd64", "v4l2loopback-dkms", "qemu-system-x86", "busybox-static",
                "v4l-utils", "ffmpeg", "gstreamer1.0-tools", "gstreamer1.0-plugins-good",
                "gstreamer1.0-plugins-base-apps", "chromium", "iproute2", "pulseaudio",
                "pulseaudio-utils")  # fmt: skip
VIRTME_NG = "virtme-ng==1.42"
# the camera's readers, and the sound server for the LiveCam Microphone
CAMERA_CLIENTS = ("ffmpeg", "v4l2-ctl", "gst-launch-1.0", "gst-device-monitor-1.0", "chromium",
                  "pulseaudio", "pactl")  # fmt: skip
TCG_CPU = "Nehalem"  # x86-64-v2 (numpy's baseline), no AVX to emulate


@dataclass(frozen=True)
class Kernel:
    image: Path  # /boot/vmlinuz-RELEASE
    release: str


def find_kernel(module: str = "v4l2loopback") -> Kernel | None:
    """The newest installed kernel that has `module` (v4l2loopback: built for it by dkms)."""
    for image in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = image.removeprefix("/boot/vmlinuz-")
        if glob.glob(f"/lib/modules/{release}/**/{module}.ko*", recursive=True):
            return Kernel(Path(image), release)
    return None


def _tool(name: str) -> str | None:
    """A command from PATH or from this interpreter's venv (virtme-ng installs there)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def unavailable(module: str = "v4l2loopback",
                tools: tuple[str, ...] = CAMERA_CLIENTS) -> str | None:  # fmt: skip
    """Why the guest cannot boot here with `module` and `tools` (with the fix), or None."""
    if _tool("qemu-system-x86_64") is None:
        return f"qemu is not installed: apt-get install {' '.join(APT_PACKAGES)}"
    if find_kernel(module) is None:
        return (f"no kernel with {module} in /boot and /lib/modules: apt-get install "
                f"{' '.join(APT_PACKAGES)} linux-headers-amd64")  # fmt: skip
    if _tool("vng") is None:
        return f"virtme-ng is not installed: pip install {VIRTME_NG}"
    if not any(shutil.which(name) for name in ("busybox-static", "busybox.static", "busybox")):
        # virtme-ng builds the guest's initramfs around it ("no busybox was found")
        return f"busybox is not installed: apt-get install {' '.join(APT_PACKAGES)}"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install {' '.join(APT_PACKAGES)}"
    return None


def use_kvm() -> bool:
    """KVM only where asked for: nested under some hypervisors the guest hangs at boot."""
    return os.environ.get("LIVECAM_KERNEL_KVM") == "1" and os.access("/dev/kvm", os.W_OK)


def _args(command: list[str], rwdir: Path, cpus: int, memory: str, module: str,
          qemu_opts: str) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    kernel = find_kernel(module)
    vng = _tool("vng")
    assert kernel is not None and vng is not None, unavailable(module, ())
    args = [vng, "--run", str(kernel.image), "--rwdir", str(rwdir), "--memory", memory,
            "--cpus", str(cpus), "--exec", shlex.join(command)]  # fmt: skip
    if not use_kvm():
        # emulated: a CPU without AVX runs numpy and OpenCV 2-3x faster than qemu's "max"
        qemu_opts = f"-cpu {TCG_CPU} {qemu_opts}"
        args.append("--disable-kvm")
    if qemu_opts.strip():
        args.append(f"--qemu-opts={qemu_opts.strip()}")
    # vng runs virtme-run from PATH: the venv's bin must be on it
    env = {**os.environ, "PATH": f"{Path(vng).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return args, env


def boot(command: list[str], rwdir: Path, timeout: float, cpus: int = 2,
         memory: str = "2G") -> subprocess.CompletedProcess:  # fmt: skip
    """Run `command` as root in a fresh guest; the guest powers off when it ends."""
    args, env = _args(command, rwdir, cpus, memory, "v4l2loopback", "")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=rwdir, stdin=subprocess.DEVNULL)  # fmt: skip


def start(command: list[str], rwdir: Path, log: Path, forward: tuple[int, ...],
          module: str, memory: str = "512M") -> subprocess.Popen:  # fmt: skip
    """Start `command` in a guest with one NIC on qemu's user networking (the host is
    10.0.2.2 there) and each port in `forward` forwarded from the host's 127.0.0.1 to the
    same guest port; the guest powers off when the command ends."""
    netdev = ",".join(["user,id=hop", *(f"hostfwd=tcp:127.0.0.1:{p}-:{p}" for p in forward)])
    qemu_opts = f"-device virtio-net-pci,netdev=hop -netdev {netdev}"
    args, env = _args(command, rwdir, 1, memory, module, qemu_opts)
    with log.open("w") as console:  # its own process group: stop() ends qemu with it
        return subprocess.Popen(args, stdout=console, stderr=subprocess.STDOUT, env=env,
                                cwd=rwdir, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    """End a guest from start() that did not power off."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

"""`livecam doctor`: checks what livecam needs on this machine; each problem names its fix."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from livecam.doctor.check import Check
from livecam.engines.musetalk import INSTALL


def _camera() -> list[Check]:
    from livecam.doctor.camera import camera_findings

    return camera_findings()


def _microphone() -> Check:
    from livecam.audio.portaudio import PortAudioMissing
    from livecam.audio.sources import input_devices

    try:
        found = input_devices()
    except PortAudioMissing as exc:
        return Check("microphone", False, str(exc))
    if not found:
        return Check("microphone", False, "no input device: plug one in, check "
                     "`pactl list short sources` (livecam start shows idle frames and "
                     "waits for one)")  # fmt: skip
    return Check("microphone", True, f"{len(found)} input(s), e.g. {found[0]['name']!r}")


def _tools() -> list[Check]:
    from livecam.audio import pulse

    ffmpeg, server = shutil.which("ffmpeg") is not None, pulse.available()
    return [
        Check("ffmpeg", ffmpeg, "found" if ffmpeg else "needed by render and --sink file: "
              "sudo apt-get install ffmpeg"),
        Check("PulseAudio/PipeWire", server, "server answers" if server else "needed by "
              "--virtual-mic: sudo apt-get install pulseaudio-utils, and run PulseAudio or "
              "PipeWire-Pulse", required=False),
    ]  # fmt: skip


def _neural() -> list[Check]:
    if importlib.util.find_spec("torch") is None:
        return [Check("torch", False, INSTALL + " (musetalk only)", required=False)]
    import torch

    from livecam.engines.musetalk.download import verify
    from livecam.engines.musetalk.manifest import default_models_dir

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none: musetalk would run on the CPU, slowly"
    models_dir = default_models_dir()
    rows, results, ok = verify(models_dir, load=False)  # hashes each file once (memoized)
    missing = [name for name, result in results.items() if result == "missing"]
    differ = [str(r.path.relative_to(models_dir)) for r in rows if r.hash_status == "mismatch"]
    if not ok:
        weights = f"missing {', '.join(missing)}: `livecam models download`"
    elif differ:
        ok = False
        weights = (f"{', '.join(differ)} in {models_dir} differ from the release: "
                   "`livecam models verify`, then delete them and download again")  # fmt: skip
    else:
        weights = f"present in {models_dir}, sha256 of the release"
    return [
        Check("GPU", cuda, f"torch {torch.__version__}, {gpu}", required=False),
        Check("musetalk weights", ok, weights, required=False),
    ]


def _avatars() -> Check:
    from livecam.avatar.store import list_avatars

    avatars = list_avatars()
    stale = [a.name for a in avatars if a.status == "stale"]
    detail = ", ".join(f"{a.name} ({a.status})" for a in avatars)
    if stale:
        detail += "; stale caches are rebuilt on next use"
    return Check("avatars", bool(avatars), detail)


def _face_models() -> Check:
    from livecam.avatar.landmarks import FaceModelError, check_models

    try:
        check_models()
    except FaceModelError as exc:
        return Check("face models", False, str(exc))
    return Check("face models", True, "MediaPipe face landmarker (Apache-2.0), sha256 verified")


def run_checks(
    camera_only: bool = False, remote: str | None = None, token_file: Path | None = None
) -> list[Check]:
    """Everything (`remote`: the pool `livecam start --remote` would use), or the camera."""
    if camera_only:
        return _camera()
    checks = [*_camera(), _microphone(), *_tools(), _avatars(), _face_models(), *_neural()]
    if remote:
        from livecam.doctor.remote import remote_check

        checks.append(remote_check(remote, token_file))
    return checks

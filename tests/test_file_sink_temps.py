"""The file sink's temporaries: fresh files of its own (never a planted symlink), never shared by
two renders to one --out, gone on every way out; --out replaced whole, with a file's usual mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from livecam.sinks import SinkError
from livecam.sinks import file as file_sink
from livecam.sinks.file import FileSink
from tests.conftest import REPO
from tests.test_sinks_file import FPS, H, W, audio, frame, probe

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffmpeg")


def _render(out: Path, frames: int) -> FileSink:
    sink = FileSink(out, W, H, FPS)
    for k in range(frames):
        sink.send(frame(k), audio(k + FPS))  # sound from the first frame on
    return sink


def _durations(path: Path) -> list[float]:
    return sorted(round(float(s["duration"]), 1) for s in probe(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_planted_symlink_is_never_written_through(tmp_path, monkeypatch):
    out, victim = tmp_path / "out.mp4", tmp_path / "victim.txt"
    victim.write_text("precious")
    for suffix in ("video.mp4", "audio.f32", "mux.mp4"):
        (tmp_path / f".out.mp4.planted.{suffix}").symlink_to(victim)
    fresh = iter(range(100))
    # each temporary's first try is the planted name: O_EXCL refuses it, the next one is new
    names = lambda: iter(["planted", *(f"fresh{next(fresh)}" for _ in range(3))])  # noqa: E731
    monkeypatch.setattr(tempfile, "_get_candidate_names", names)
    _render(out, 10).close()
    assert victim.read_text() == "precious"
    assert _durations(out) == [0.3, 0.3]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == [
        "out.mp4", "victim.txt"]  # fmt: skip


def test_two_renders_to_one_out_both_complete(tmp_path):
    out = tmp_path / "out.mp4"
    short, long = FileSink(out, W, H, FPS), FileSink(out, W, H, FPS)
    for k in range(2 * FPS):  # interleaved, as two processes would be
        if k < FPS:
            short.send(frame(k), audio(k + FPS))
        long.send(frame(k), audio(k + FPS))
    short.close()
    assert _durations(out) == [1.0, 1.0]  # the first to finish, whole
    long.close()
    assert _durations(out) == [2.0, 2.0]  # then the second, whole: never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_two_render_processes_to_one_out(tmp_path):
    out = tmp_path / "out.mp4"
    child = textwrap.dedent(f"""
        import sys
        from tests.test_file_sink_temps import _render
        _render(__import__("pathlib").Path({str(out)!r}), int(sys.argv[1])).close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(n)], stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for n in (FPS, 2 * FPS)]  # fmt: skip
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert _durations(out) in ([1.0, 1.0], [2.0, 2.0])  # one of them, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_out_is_replaced_whole_with_a_files_usual_mode(tmp_path):
    out, victim = tmp_path / "out.mp4", tmp_path / "victim.txt"
    _render(out, 3).close()
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not the temporaries' 0600
    out.chmod(0o640)
    _render(out, 3).close()
    assert out.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    victim.write_text("precious")
    out.unlink()
    out.symlink_to(victim)
    _render(out, 3).close()
    assert victim.read_text() == "precious" and not out.is_symlink()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_every_way_out_removes_the_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    FileSink(out, W, H, FPS).close()  # no frames
    silent = FileSink(out, W, H, FPS)
    silent.send(frame(0), np.zeros(0, np.float32))
    silent.close()  # no sound: the video alone
    assert [s["codec_type"] for s in probe(out)] == ["video"]
    killed = _render(out, 5)
    killed._proc.kill()
    with pytest.raises(SinkError, match="ffmpeg failed"):
        killed.close()
    assert _leftovers(tmp_path) == []

    real_mkstemp, calls = tempfile.mkstemp, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(file_sink.tempfile, "mkstemp", second_fails)
    with pytest.raises(SinkError, match=f"cannot write {out}: No space left on device"):
        FileSink(out, W, H, FPS)  # the sound's temporary, made first, is removed
    assert _leftovers(tmp_path) == []


def test_a_failed_mux_keeps_only_the_sound(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(file_sink, "AUDIO_BITRATE", "not-a-bitrate")
    out = tmp_path / "out.mp4"
    _render(out, 10).close()
    (kept,) = _leftovers(tmp_path)
    assert kept.endswith(".audio.f32") and kept in caplog.text
    assert (tmp_path / kept).stat().st_size == 10 * 16000 // FPS * 4


def test_a_failed_render_closes_its_sink(tmp_path):
    from livecam.session import render_audio

    class Broken:
        def samples_needed(self, _frame: int) -> int:
            return 0

        def generate(self, *_a):
            raise RuntimeError("engine broke")

    class Compositor:
        fps = FPS

    sink = FileSink(tmp_path / "out.mp4", W, H, FPS)
    with pytest.raises(RuntimeError, match="engine broke"):
        render_audio(np.zeros(16000, np.float32), Broken(), Compositor(), sink)  # type: ignore[arg-type]
    assert _leftovers(tmp_path) == [] and sink._proc.poll() is not None


DISK_FULL = """
import sys, numpy as np
from pathlib import Path
from livecam.sinks import SinkError
from livecam.sinks.file import FileSink
sink = FileSink(Path(sys.argv[1]) / "out.mp4", 160, 120, 30)
noise = np.random.default_rng(0)
try:
    for k in range(3000):  # incompressible frames: far more than fits
        sink.send(noise.integers(0, 255, (120, 160, 3), np.uint8), np.zeros(533, np.float32))
finally:
    try:
        sink.close()
    except SinkError as exc:
        print("close:", exc, file=sys.stderr)
"""


def _on_a_small_disk(tmp_path: Path, child: str, then: str = "") -> subprocess.CompletedProcess:
    """Python `child` run with a 600 kB tmpfs folder as its argument, in a private mount
    namespace; prints its "rc=N", what it left there, then what shell command `then` prints
    there (the mount is gone with the child: what the sink left is looked at from inside)."""
    from tests.test_cache_hardening import _namespace, _run

    folder = tmp_path / "small"
    folder.mkdir()
    script = f"""mount -t tmpfs -o size=600k tmpfs "$1" || exit 99
    "$3" -c "$2" "$1"; echo "rc=$?"; ls -A "$1"
    {then}
    """
    return _run(*_namespace(), "sh", "-c", script, "sh", str(folder), child, sys.executable)


def test_a_really_full_disk_keeps_a_playable_file(tmp_path):
    count = ("ffprobe -v error -count_frames -show_entries stream=nb_read_frames -of csv=p=0 "
             '"$1/out.mp4"')  # fmt: skip
    proc = _on_a_small_disk(tmp_path, DISK_FULL, count)
    assert proc.stdout.split()[:2] == ["rc=1", "out.mp4"], proc.stdout + proc.stderr
    assert int(proc.stdout.split()[2]) > 10  # playable: the frames before the disk filled
    error = proc.stderr.split("SinkError: ", 1)[1].splitlines()[0]  # one line, saying why
    assert error.endswith(": No space left on device"), proc.stderr  # (sound or video first)


SOUNDTRACK_TOO_BIG = """
import sys, numpy as np
from pathlib import Path
from livecam.sinks import SinkError
from livecam.sinks.file import FileSink
try:  # 20 s of sound, 1.28 MB of float32: more than the disk holds
    FileSink(Path(sys.argv[1]) / "out.mp4", 160, 120, 30, np.zeros(320000, np.float32))
except SinkError as exc:
    print("open:", exc, file=sys.stderr)
"""


def test_a_soundtrack_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path):
    proc = _on_a_small_disk(tmp_path, SOUNDTRACK_TOO_BIG)
    assert proc.stdout.split() == ["rc=0"], proc.stdout + proc.stderr  # no temporaries left
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith(": No space left on device"), proc.stderr

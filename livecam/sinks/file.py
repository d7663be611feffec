"""File sink: H.264 mp4 through an ffmpeg subprocess, audio muxed in on close (or, for a
render, whose sound is known before the first frame, encoded with the video in one pass).

Video goes to a temporary fragmented mp4 next to `path` (playable at every keyframe, so a
killed encoder still leaves a video), audio to a temporary raw float32 file (plain writes: a
full disk is an OSError with its errno); `close()` muxes both (AAC) into a third temporary
and renames it over `path`, so `path` is only ever replaced whole. Temporaries are made with
mkstemp (O_EXCL, a fresh name, mode 0600) in the output's folder and written through their
file descriptors: never through a planted symlink, never shared by two renders to one `path`
(the last to finish wins). Every way out of the sink removes them; only the audio of a
failed mux is kept (and named in the log).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from livecam.constants import SAMPLE_RATE
from livecam.sinks.base import SinkError, check_frame

log = logging.getLogger(__name__)

# `livecam render` of jfk.wav at 1280x720 (330 frames, 11 s audio; engine, encode and mux) on
# 2 cores: superfast 3.2 s and 4.1 MB, ultrafast 2.7 s and 4.9 MB (+18 %); veryfast's
# lookahead delays fragments. The encoder's CPU matters more than the file size here.
X264_PRESET = "ultrafast"
X264_TUNE = "zerolatency"  # live fragments: sliced threads, no lookahead, each flushes promptly
X264_CRF = 20
FRAG_MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
AUDIO_BITRATE = "128k"
PIPE_SIZE = 1 << 20  # larger stdin pipe: fewer context switches per frame


def find_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise SinkError("ffmpeg not found; install it with `sudo apt install ffmpeg`")
    return exe


def encode_command(ffmpeg: str, path: Path, width: int, height: int, fps: float,
                   soundtrack: Path | None = None) -> list[str]:  # fmt: skip
    """ffmpeg arguments: raw I420 frames on stdin -> fragmented H.264 mp4 at `path`; or, with
    the raw float32 `soundtrack` known ahead, H.264 and AAC in a plain mp4 (fragments would
    lose the AAC encoder's delay: the sound 1024 samples, 64 ms, late)."""
    gop = max(1, round(2 * fps))  # keyframe (and so a fragment) every 2 s
    sound, movflags, tune = ["-an"], FRAG_MOVFLAGS, ["-tune", X264_TUNE]
    if soundtrack is not None:
        sound = [
            "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", str(soundtrack),
            "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", AUDIO_BITRATE,
        ]  # fmt: skip
        movflags, tune = "+faststart", []  # a file written whole: frame threads, 8 % faster
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps),
        "-i", "pipe:0", *sound,
        "-c:v", "libx264", "-preset", X264_PRESET, *tune,
        "-crf", str(X264_CRF), "-g", str(gop), "-pix_fmt", "yuv420p",
        "-movflags", movflags, "-flush_packets", "1", "-f", "mp4", str(path),
    ]  # fmt: skip


def mux_command(ffmpeg: str, video: Path, audio: Path, out: Path) -> list[str]:
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-i", str(video), "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", str(audio),
        "-map", "0:v:0", "-map", "1:a:0",
        "-c:v", "copy", "-c:a", "aac", "-b:a", AUDIO_BITRATE,
        "-movflags", "+faststart", "-f", "mp4", str(out),
    ]  # fmt: skip


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise SinkError(f"output {path} is a folder; give a file name such as {path / 'out.mp4'}")
    folder = path.parent
    if not folder.is_dir():
        raise SinkError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SinkError(f"output folder {folder} is not writable")


class FileSink:
    """Writes frames and their audio to an mp4 file; frame k gets audio [k/fps, (k+1)/fps)."""

    def __init__(self, path: Path, width: int, height: int, fps: float,
                 soundtrack: np.ndarray | None = None) -> None:  # fmt: skip
        """`soundtrack`: the whole sound when it is known before the first frame (a render):
        it is encoded in the same pass as the video, with no mux on close, and the audio
        that comes with each frame only times the frames."""
        if width % 2 or height % 2:
            raise SinkError(f"video files need an even width and height, got {width}x{height}")
        self.path = Path(path).expanduser().absolute()
        self.width, self.height, self.fps = width, height, fps
        self.name = f"file {self.path}"
        self.latency_s = 0.0
        self.frames = 0
        self.audio_samples = 0
        self._got_audio = False
        self._audio_ok = True
        self._in_one_pass = soundtrack is not None
        self._ffmpeg = find_ffmpeg()
        _check_path(self.path)
        self._temps: list[Path] = []
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the sink)
        fds: list[int] = []
        try:
            audio_fd, self._audio_path = self._temporary(".audio.f32")
            sound = None
            if soundtrack is not None:
                fds.append(os.dup(audio_fd))  # ffmpeg reads the soundtrack through it
                sound = _fd_path(fds[-1])
            self._audio = os.fdopen(audio_fd, "wb")
            if soundtrack is not None:
                self._write_soundtrack(soundtrack)
            video_fd, self._video_path = self._temporary(".video.mp4")
            fds.append(video_fd)
            cmd = encode_command(self._ffmpeg, _fd_path(video_fd), width, height, fps, sound)
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stderr=self._stderr, pass_fds=tuple(fds)
            )
        except OSError as e:
            if hasattr(self, "_proc"):
                self._proc.kill()
                self._proc.wait()
            if hasattr(self, "_audio"):
                with contextlib.suppress(OSError):  # (a full disk fails its flush again)
                    self._audio.close()
            self._stderr.close()
            self._remove_temps()
            raise SinkError(f"cannot write {self.path}: {e.strerror or e}") from e
        finally:
            for fd in fds:
                os.close(fd)
        _grow_pipe(self._proc.stdin)
        self._closed = False

    def _write_soundtrack(self, soundtrack: np.ndarray) -> None:
        """All of it, padded with silence to a whole frame (a render's last frame)."""
        sound = np.asarray(soundtrack, "<f4").reshape(-1)
        frames = math.ceil(sound.size * self.fps / SAMPLE_RATE)
        self._audio.write(sound.tobytes())
        padding = round(frames * SAMPLE_RATE / self.fps) - sound.size
        self._audio.write(np.zeros(max(padding, 0), "<f4").tobytes())
        self._audio.close()

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        if self._closed:
            raise SinkError(f"file sink {self.path} is closed")
        try:
            self._write_audio(audio)
        except OSError as e:  # a full disk: what is written so far is kept on close
            self._audio_ok = False
            raise SinkError(f"cannot write the sound of {self.path}: {e.strerror or e}") from e
        # a frame that brings several frames' audio (the camera clock dropped ticks) is shown
        # that long, as a camera would have, so the video keeps the audio's length
        audio_frames = round(self.audio_samples * self.fps / SAMPLE_RATE)
        repeats = max(1, audio_frames - self.frames)
        try:
            # BGR -> I420 here is ~0.4 ms and halves the pipe traffic and ffmpeg's work.
            data = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).data
            for _ in range(repeats):
                self._proc.stdin.write(data)
        except (BrokenPipeError, ValueError) as e:
            raise SinkError(f"ffmpeg stopped while writing {self.path}: {self._errors()}") from e
        self.frames += repeats

    def _write_audio(self, audio: np.ndarray) -> None:
        # Pad with silence up to this frame's start so audio stays aligned with the video.
        start = round(self.frames * SAMPLE_RATE / self.fps)
        if self.audio_samples < start:
            if not self._in_one_pass:
                self._audio.write(np.zeros(start - self.audio_samples, "<f4").tobytes())
            self.audio_samples = start
        if audio.size:
            self._got_audio = True
            if not self._in_one_pass:
                self._audio.write(np.asarray(audio, "<f4").reshape(-1).tobytes())
            self.audio_samples += audio.size

    def close(self) -> None:
        """Finish the video, mux the audio in and put the result at `path`; raises SinkError
        if the video failed (what the encoder wrote before is still put there)."""
        if self._closed:
            return
        self._closed = True
        try:
            sound = self._finish_audio()
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            code = self._proc.wait()
            if code != 0:
                # fragments play up to where the encoder stopped; a plain mp4 without its end
                # does not play at all
                if self._video_path.stat().st_size and not self._in_one_pass:
                    self._publish(self._video_path)
                raise SinkError(f"ffmpeg failed writing {self.path} (exit {code}): "
                                f"{self._errors()}")  # fmt: skip
            muxed = sound and not self._in_one_pass and self._mux()
            self._publish(muxed or self._video_path)
        except OSError as e:  # e.g. a full disk
            raise SinkError(f"cannot write {self.path}: {e.strerror or e}") from None
        finally:
            if self._proc.poll() is None:  # on the way out of an error
                self._proc.kill()
                self._proc.wait()
            self._stderr.close()
            self._remove_temps()

    def _finish_audio(self) -> bool:
        """Pad the audio to the video's end and close it; False if there is none to mux."""
        try:
            if self._audio_ok:
                self._write_audio(np.zeros(0, np.float32))
            self._audio.close()
        except OSError as e:
            if self._audio_ok:  # (else send() said so already)
                log.error("cannot finish the sound of %s (%s): the video has none", self.path, e)
            self._audio_ok = False
            with contextlib.suppress(OSError):
                self._audio.close()  # drops what could not be written
        return self._audio_ok and self.frames > 0 and self._got_audio

    def _mux(self) -> Path | None:
        """The video with the audio muxed in (a temporary), or None to keep the video alone."""
        try:
            fd, tmp = self._temporary(".mux.mp4")
        except OSError as e:
            return self._mux_failed(str(e))
        try:
            cmd = mux_command(self._ffmpeg, self._video_path, self._audio_path, _fd_path(fd))
            result = subprocess.run(
                cmd, capture_output=True, text=True, check=False, pass_fds=(fd,)
            )
        finally:
            os.close(fd)
        if result.returncode != 0:
            return self._mux_failed(result.stderr.strip()[-500:])
        return tmp

    def _mux_failed(self, reason: str) -> None:
        self._temps.remove(self._audio_path)  # the sound is kept for the user
        log.error("muxing audio into %s failed, keeping the video without sound (the sound is "
                  "kept at %s, raw float32 16 kHz mono: ffmpeg -f f32le -ar %d -ac 1 -i FILE "
                  "sound.wav): %s", self.path, self._audio_path, SAMPLE_RATE,
                  reason)  # fmt: skip

    def _publish(self, tmp: Path) -> None:
        """Rename a finished temporary over `path`, with the mode a new file would get (or the
        old file's)."""
        try:
            mode = os.lstat(self.path).st_mode
            mode = stat.S_IMODE(mode) if stat.S_ISREG(mode) else _new_file_mode()
        except FileNotFoundError:
            mode = _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, self.path)

    def _temporary(self, suffix: str) -> tuple[int, Path]:
        """A new, empty file of our own next to `path`, open (O_EXCL: an existing name or
        symlink is never reused); removed when the sink closes."""
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix,
                                    dir=self.path.parent)  # fmt: skip
        self._temps.append(Path(name))
        return fd, Path(name)

    def _remove_temps(self) -> None:
        for path in self._temps:
            path.unlink(missing_ok=True)  # a published one is gone already
        self._temps.clear()

    def _errors(self) -> str:
        """ffmpeg's messages on one line."""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = re.sub(r"(file )?/dev/fd/\d+", "the temporary file", "; ".join(lines))
        return text[-500:] or "no error message"


def _fd_path(fd: int) -> Path:
    """ffmpeg writes to an open file of ours by this name (passed with pass_fds): opening it
    reopens that file, whatever name it has by then."""
    return Path(f"/dev/fd/{fd}")


def _new_file_mode() -> int:
    """0666 less the process umask (read without changing it: other threads may create files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return 0o644


def _grow_pipe(pipe: IO[bytes]) -> None:
    # Above the system limit (/proc/sys/fs/pipe-max-size) the default pipe works too.
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)

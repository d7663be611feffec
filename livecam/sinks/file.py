"""File sink: H.264 mp4 through an ffmpeg subprocess, audio muxed in on close.

Video goes straight to `path` as fragmented mp4, so a killed encoder still leaves a playable
(video-only) file. Audio goes to a temporary WAV next to it; `close()` muxes both (AAC) into a
temporary file and renames it over `path`. Temporaries are made with mkstemp (O_EXCL, a fresh
name) in the output's folder: never through a planted symlink, never shared by two renders.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import cv2
import numpy as np
import soundfile as sf

from livecam.constants import SAMPLE_RATE
from livecam.sinks.base import SinkError, check_frame

log = logging.getLogger(__name__)

# `livecam render` of jfk.wav at 1280x720 (330 frames, 11 s audio; engine, encode and mux) on
# 2 cores: superfast 3.2 s and 4.1 MB, ultrafast 2.7 s and 4.9 MB (+18 %); veryfast's
# lookahead delays fragments. The encoder's CPU matters more than the file size here.
X264_PRESET = "ultrafast"
X264_TUNE = "zerolatency"  # no lookahead or B-frames: faster here, fragments flush promptly
X264_CRF = 20
FRAG_MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
AUDIO_BITRATE = "128k"
PIPE_SIZE = 1 << 20  # larger stdin pipe: fewer context switches per frame


def find_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise SinkError("ffmpeg not found; install it with `sudo apt install ffmpeg`")
    return exe


def encode_command(ffmpeg: str, path: Path, width: int, height: int, fps: float) -> list[str]:
    """ffmpeg arguments: raw I420 frames on stdin -> fragmented H.264 mp4 at `path`."""
    gop = max(1, round(2 * fps))  # keyframe (and so a fragment) every 2 s
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps),
        "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", X264_PRESET, "-tune", X264_TUNE,
        "-crf", str(X264_CRF), "-g", str(gop), "-pix_fmt", "yuv420p",
        "-movflags", FRAG_MOVFLAGS, "-flush_packets", "1", "-f", "mp4", str(path),
    ]  # fmt: skip


def mux_command(ffmpeg: str, video: Path, audio: Path, out: Path) -> list[str]:
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-i", str(video), "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0",
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

    def __init__(self, path: Path, width: int, height: int, fps: float) -> None:
        if width % 2 or height % 2:
            raise SinkError(f"video files need an even width and height, got {width}x{height}")
        self.path = Path(path).expanduser().absolute()
        self.width, self.height, self.fps = width, height, fps
        self.name = f"file {self.path}"
        self.latency_s = 0.0
        self.frames = 0
        self.audio_samples = 0
        self._got_audio = False
        self._ffmpeg = find_ffmpeg()
        _check_path(self.path)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the sink)
        try:
            self._wav_path = _temporary(self.path, ".audio.wav")
            self._wav = sf.SoundFile(
                self._wav_path,
                "w",
                samplerate=SAMPLE_RATE,
                channels=1,
                subtype="FLOAT",
                format="WAV",
            )
            cmd = encode_command(self._ffmpeg, self.path, width, height, fps)
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self._stderr)
        except (OSError, RuntimeError) as e:  # soundfile raises RuntimeError subclasses
            self._stderr.close()
            if hasattr(self, "_wav"):
                self._wav.close()
            if hasattr(self, "_wav_path"):
                self._wav_path.unlink(missing_ok=True)
            raise SinkError(f"cannot write {self.path}: {e}") from e
        _grow_pipe(self._proc.stdin)
        self._closed = False

    def send(self, frame: np.ndarray, audio: np.ndarray) -> None:
        check_frame(frame, self.width, self.height)
        if self._closed:
            raise SinkError(f"file sink {self.path} is closed")
        self._write_audio(audio)
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
            self._wav.write(np.zeros(start - self.audio_samples, np.float32))
            self.audio_samples = start
        if audio.size:
            self._got_audio = True
            self._wav.write(np.asarray(audio, np.float32).reshape(-1))
            self.audio_samples += audio.size

    def close(self) -> None:
        """Finish the video and mux the audio in; raises SinkError if the video failed."""
        if self._closed:
            return
        self._closed = True
        self._write_audio(np.zeros(0, np.float32))  # pad audio to the video's end
        self._wav.close()
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()
        code = self._proc.wait()
        errors = self._errors()
        self._stderr.close()
        if code != 0:
            self._wav_path.unlink(missing_ok=True)
            raise SinkError(f"ffmpeg failed writing {self.path} (exit {code}): {errors}")
        self._mux()

    def _mux(self) -> None:
        if self.frames == 0 or not self._got_audio:
            self._wav_path.unlink(missing_ok=True)
            return
        try:
            tmp = _temporary(self.path, ".mux.mp4")
        except OSError as exc:
            log.error("cannot mux audio into %s (%s); the video has no sound, the audio is "
                      "kept at %s", self.path, exc, self._wav_path)  # fmt: skip
            return
        cmd = mux_command(self._ffmpeg, self.path, self._wav_path, tmp)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            log.error(
                "muxing audio into %s failed, keeping the video without sound (audio kept "
                "at %s): %s",
                self.path,
                self._wav_path,
                result.stderr.strip()[-500:],
            )
            return
        os.replace(tmp, self.path)
        self._wav_path.unlink(missing_ok=True)

    def _errors(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-500:] or "no error message"


def _temporary(path: Path, suffix: str) -> Path:
    """A new, empty file of our own next to `path` (O_EXCL: an existing name or symlink is
    never reused)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _grow_pipe(pipe: IO[bytes]) -> None:
    # Above the system limit (/proc/sys/fs/pipe-max-size) the default pipe works too.
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)

"""Runs inside the guest (stdlib only, so it starts fast under emulation): loads
v4l2loopback, drives `livecam start` against /dev/video10 with ffmpeg as the reader, and
writes what it saw to OUT/results.json (one entry per scenario) plus raw frames for the host
to check. A private PulseAudio runs for the LiveCam Microphone.
Usage: python3 guest_run.py OUT REPO PYTHON AUDIO
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

DEV = "/dev/video10"
MODPROBE = ["modprobe", "v4l2loopback", "devices=1", "video_nr=10", "card_label=LiveCam",
            "exclusive_caps=1"]  # fmt: skip
OUT, REPO, PY, AUDIO = (Path(a) for a in sys.argv[1:5])
RUN = Path("/dev/shm/livecam-run")  # Unix sockets cannot be bound on the 9p root
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "LIVECAM_RUNTIME_DIR": str(RUN),
    "HOME": "/dev/shm/home",
    "XDG_RUNTIME_DIR": "/dev/shm/xdg",
    "PYTHONUNBUFFERED": "1",
    "COLUMNS": "300",
}  # fmt: skip (COLUMNS: unwrapped log lines)
SLOW = float(os.environ.get("LIVECAM_GUEST_SLOWNESS", "1"))  # scales every wait
SMALL = ("--size", "640x360")  # scenarios about the device, not the picture: cheaper frames
PULSE_SOCKET = Path("/dev/shm/pulse/native")
results: dict[str, dict] = {}


def sh(*cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * SLOW, **kw)


def wait_for(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def device_caps() -> str:
    """'capture', 'output', 'capture+output', or 'absent' (what readers and writers see)."""
    if not os.path.exists(DEV):
        return "absent"
    text = sh("v4l2-ctl", "-d", DEV, "-D").stdout
    block = text.split("Device Caps", 1)[-1]
    kinds = [k for k, word in (("capture", "Video Capture"), ("output", "Video Output"))
             if word in block]  # fmt: skip
    return "+".join(kinds) or "none"


def logged(log: Path, text: str) -> bool:
    """`text` is in the log, whatever line wrapping the log has."""
    return " ".join(text.split()) in " ".join(log.read_text().split())


def start_livecam(name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = OUT / f"{name}.log"
    cmd = [str(PY), "-m", "livecam", "start", "--sink", "virtualcam", "--camera", DEV,
           "--audio", str(AUDIO), "--loop", "--no-dashboard", "--no-idle", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)
    return proc, log


def control(cmd: str, timeout: float = 10) -> dict | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout * SLOW)
            conn.connect(str(RUN / "livecam.sock"))
            conn.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            return json.loads(conn.makefile("rb").readline())
    except (OSError, ValueError):
        return None


def running(timeout: float) -> dict | None:
    """Wait for the daemon to answer a status request (its pipeline is up); that status."""
    found: list[dict | None] = []
    wait_for(lambda: "frames_shown" in (found.append(control("status")) or found[-1] or {}),
             timeout, 1.0)  # fmt: skip
    return found[-1] if found and "frames_shown" in (found[-1] or {}) else None


def capture(name: str, seconds: float, max_frames: int) -> dict:
    """ffmpeg reads the camera as an app would; frames go raw (native format) to OUT/name."""
    path = OUT / f"{name}.raw"
    t0 = time.monotonic()
    proc = sh("ffmpeg", "-hide_banner", "-nostdin", "-f", "v4l2", "-i", DEV, "-t", str(seconds),
              "-frames:v", str(max_frames), "-c:v", "copy", "-f", "rawvideo", "-y", str(path),
              timeout=seconds + 120)  # fmt: skip
    elapsed = time.monotonic() - t0
    info: dict = {"rc": proc.returncode, "seconds": elapsed, "stderr": proc.stderr[-1500:]}
    stream = re.search(r"Video: rawvideo \(([^)]*)\)[^,]*, (\w+)[^,]*, (\d+)x(\d+)", proc.stderr)
    if proc.returncode == 0 and stream:
        width, height = int(stream[3]), int(stream[4])
        per_pixel = {"yuv420p": 1.5, "nv12": 1.5, "yuyv422": 2, "uyvy422": 2, "bgr24": 3,
                     "rgb24": 3}[stream[2]]  # fmt: skip
        frame_bytes = int(width * height * per_pixel)
        frames = path.stat().st_size // frame_bytes
        info.update(fourcc=stream[1], pix_fmt=stream[2], width=width, height=height,
                    frames=frames, file=path.name, fps_received=frames / elapsed)  # fmt: skip
    return info


def gst_client() -> dict:
    """GStreamer, as many Linux apps use it: list the cameras, capture with v4l2src."""
    monitor = sh("gst-device-monitor-1.0", "Video/Source", timeout=120)
    labels = re.findall(r"name\s*:\s*(.+)", monitor.stdout)
    path = OUT / "gst.raw"
    run = sh("gst-launch-1.0", "-v", "v4l2src", f"device={DEV}", "num-buffers=3", "!",
             "videoconvert", "!", "video/x-raw,format=BGR", "!", "filesink",
             f"location={path}", timeout=180)  # fmt: skip
    caps = re.search(r"v4l2src0\.GstPad:src: caps = (video/x-raw.*)", run.stdout)
    fields = dict(re.findall(r"(\w+)=\(\w+\)([^,]+)", caps[1])) if caps else {}
    info: dict = {"labels": labels, "monitor_rc": monitor.returncode, "rc": run.returncode,
                  "out": (run.stdout + run.stderr)[-1500:]}  # fmt: skip
    if {"format", "width", "height"} <= fields.keys():
        info.update(format=fields["format"], width=int(fields["width"]),
                    height=int(fields["height"]), pix_fmt="bgr24", file=path.name)  # fmt: skip
    return info


class _PageServer(http.server.ThreadingHTTPServer):
    """Serves the test page on 127.0.0.1 (a secure context for getUserMedia) and keeps what
    the page posts back: /frame and /far-frame (PNG) and /result (JSON)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PageHandler)
        self.posted: dict[str, bytes] = {}
        self.steps: list[tuple[str, float]] = []  # how far the page got, and when
        self.fetched = threading.Event()  # the browser asked for the page
        self.done = threading.Event()


class _PageHandler(http.server.BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:
        self.server.steps.append((f"GET {self.path}", time.monotonic()))
        self.server.fetched.set()
        body = (Path(__file__).with_name("camera_page.html")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posted[self.path] = data
        if self.path == "/step":
            self.server.steps.append((data.decode(errors="replace"), time.monotonic()))
        self.send_response(204)
        self.end_headers()
        if self.path == "/result":
            self.server.done.set()

    def log_message(self, *args) -> None:
        pass


def chromium_client() -> dict:
    """Headless Chromium as a meeting app: the page lists the cameras, opens LiveCam with
    getUserMedia (the permission prompt answered yes), counts frames, posts one back, sends
    the camera through a WebRTC call and posts back a frame of the far end, then picks the
    LiveCam Microphone and sends it through a call of its own; and the calls' statistics."""
    server = _PageServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    t0 = time.monotonic()
    # seen answering after 60-122 s under emulation, and not within 240 s on a loaded host;
    # once, on a loaded host, it had not even asked for the page after 480 s: a browser
    # that has not asked for it within 240 s is started again, once, with a fresh profile
    for starts in (1, 2):
        started = time.monotonic()
        browser = _start_chromium(url, starts)
        asked = server.fetched.wait(240 * SLOW if starts == 1 else 480 * SLOW)
        left = 480 * SLOW - (time.monotonic() - started)
        answered = asked and server.done.wait(max(left, 0.0))
        browser.terminate()
        stop_process(browser, 30)
        if asked:
            break
    server.shutdown()
    info: dict = {"answered": answered, "seconds": round(time.monotonic() - t0, 1),
                  "starts": starts,
                  "steps": [(name, round(at - t0, 1)) for name, at in server.steps],
                  "log": (OUT / f"chromium-{starts}.log").read_text()[-1500:]}  # fmt: skip
    if answered:
        info.update(json.loads(server.posted["/result"]))
    for path, name, key in (("/frame", "chromium.png", "file"),
                            ("/far-frame", "chromium-far.png", "far_file")):  # fmt: skip
        if path in server.posted:
            (OUT / name).write_bytes(server.posted[path])
            info[key] = name
    return info


def _start_chromium(url: str, start: int) -> subprocess.Popen:
    """Headless Chromium on `url`, with a fresh profile on a writable tmpfs; its log is
    chromium-START.log."""
    profile = Path(f"/dev/shm/chromium-{start}")
    return subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
         "--use-fake-ui-for-media-stream", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update",
         "--disable-extensions", "--mute-audio", "--no-default-browser-check",
         "--allow-loopback-in-peer-connection",  # the guest's only network is loopback
         # services a camera test does not need, each seconds of emulated CPU at start-up
         "--disable-features=WebGPU,Vulkan,OnDeviceModelService,OptimizationHints",
         f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=(OUT / f"chromium-{start}.log").open("w"), env=ENV,
    )  # fmt: skip


def scenario(fn):
    """Run one scenario; record its result or its traceback, never stop the run."""
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception:
        result = {"error": traceback.format_exc()}
    result["wall_s"] = round(time.monotonic() - t0, 1)
    results[fn.__name__] = result
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(f"guest: {fn.__name__} done in {result['wall_s']} s", flush=True)
    return result


def stop_process(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout * SLOW)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


# -- scenarios ----------------------------------------------------------------------------------
def module() -> dict:
    load = sh(*MODPROBE)
    sysfs = Path("/sys/devices/virtual/video4linux/video10/name")
    params = Path("/sys/module/v4l2loopback/parameters/exclusive_caps")
    return {"rc": load.returncode, "stderr": load.stderr, "kernel": os.uname().release,
            "card": sysfs.read_text().strip() if sysfs.exists() else None,
            "exclusive_caps": params.read_text().strip() if params.exists() else None,
            "caps_without_producer": device_caps()}  # fmt: skip


state: dict = {}


def live_run() -> dict:
    """A reader waits before livecam starts; livecam writes; ffmpeg reads; the reader
    closes and reopens; `livecam stop` closes the camera and exclusive_caps hides it."""
    early = sh("ffmpeg", "-hide_banner", "-nostdin", "-f", "v4l2", "-i", DEV, "-frames:v", "1",
               "-f", "null", "-")  # fmt: skip
    # what an app must do with exclusive_caps=1: retry (or re-list cameras) until it appears
    waiter = subprocess.Popen(
        ["sh", "-c", f"until ffmpeg -hide_banner -nostdin -loglevel error -f v4l2 -i {DEV} "
         f"-frames:v 2 -f rawvideo -y {OUT}/before.raw; do sleep 1; done"],
    )  # fmt: skip
    t0 = time.monotonic()
    proc, log = start_livecam("live", "--virtual-mic")
    status = running(240)
    shown_at = wait_for(lambda: "capture" in device_caps(), 120)
    first_frame_s = time.monotonic() - t0
    waiter_rc = stop_process(waiter, 120)
    main = capture("main", 30, 120)
    reopen = capture("reopen", 4, 3)
    gstreamer = gst_client()
    chromium = chromium_client()
    status = control("status") or {}
    rmmod = sh("rmmod", "v4l2loopback")  # refused while livecam holds the device
    stop = sh(str(PY), "-m", "livecam", "stop", env=ENV, timeout=180)
    rc = stop_process(proc, 60)
    hidden = wait_for(lambda: device_caps() == "output", 30)
    after = sh("ffmpeg", "-hide_banner", "-nostdin", "-f", "v4l2", "-i", DEV, "-frames:v", "1",
               "-f", "null", "-")  # fmt: skip
    return {
        "early_reader_stderr": early.stderr[-300:], "early_reader_rc": early.returncode,
        "camera_shown": shown_at, "first_frame_s": first_frame_s, "waiter_rc": waiter_rc,
        "before_frames": (OUT / "before.raw").stat().st_size if (OUT / "before.raw").exists()
        else 0,
        "main": main, "reopen": reopen, "gstreamer": gstreamer, "chromium": chromium,
        "status": status,
        "rmmod_while_open": {"rc": rmmod.returncode, "stderr": rmmod.stderr.strip()},
        "stop_cli": {"rc": stop.returncode, "out": (stop.stdout + stop.stderr).strip()[-500:]},
        "livecam_rc": rc, "hidden_after_stop": hidden, "caps_after_stop": device_caps(),
        "reader_after_stop": after.stderr[-200:], "log": " ".join(log.read_text().split())[-4000:],
    }  # fmt: skip


def busy_device() -> dict:
    """Another program writes the camera first: livecam names it, keeps running, takes the
    camera over when the other program ends; SIGTERM then closes it cleanly."""
    caps_before = device_caps()
    writer = subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
         "testsrc=size=320x240:rate=5", "-pix_fmt", "yuv420p", "-f", "v4l2", DEV],
    )  # fmt: skip
    held = wait_for(lambda: "capture" in device_caps(), 180)
    proc, log = start_livecam("busy", *SMALL)
    status = running(240)
    named = wait_for(lambda: logged(log, f"in use: ffmpeg (pid {writer.pid})"), 60)
    still_running = proc.poll() is None
    writer.terminate()
    writer.wait(60)
    took_over = wait_for(lambda: logged(log, "open again"), 120)
    frames = capture("takeover", 4, 3)
    status_after = control("status") or {}
    proc.send_signal(signal.SIGTERM)
    rc = stop_process(proc, 60)
    hidden = wait_for(lambda: device_caps() == "output", 30)
    return {"caps_before": caps_before, "writer_held": held, "status_while_busy": status,
            "holder_named": named,
            "running_while_busy": still_running, "took_over": took_over, "takeover": frames,
            "status_after": status_after, "sigterm_rc": rc, "hidden_after_sigterm": hidden,
            "log": " ".join(log.read_text().split())[-4000:]}  # fmt: skip


def device_returns() -> dict:
    """livecam runs while the module is not loaded (frames dropped, says why) and opens the
    camera when the module is loaded. (While livecam writes, the kernel refuses to unload the
    module, see live_run; `rmmod -f` hung this guest's kernel, so it is not tried.)"""
    unload = sh("rmmod", "v4l2loopback")
    proc, log = start_livecam("returns", *SMALL)
    status = running(240) or {}
    missing_said = wait_for(lambda: logged(log, "does not exist"), 30)
    load = sh(*MODPROBE)
    reopened = wait_for(lambda: logged(log, "open again"), 120)
    frames = capture("returned", 4, 3)
    doctor = sh(str(PY), "-c", DOCTOR, env=ENV, timeout=180)
    result = {"unload_rc": unload.returncode, "status_while_missing": status,
              "missing_said": missing_said, "load_rc": load.returncode, "reopened": reopened,
              "returned": frames,
              "doctor": doctor.stdout.strip() or doctor.stderr[-2000:]}  # fmt: skip
    result["status_end"] = control("status") or {}
    control("stop")
    result["rc"] = stop_process(proc, 60)
    result["log"] = " ".join(log.read_text().split())[-4000:]
    bench = sh(str(PY), "-c", SINK_BENCH, env=ENV, timeout=240)
    result["camera_sink"] = bench.stdout.strip() or bench.stderr[-2000:]
    return result


# what `livecam bench` reports as the camera sink's cost, on the real device at 1280x720
SINK_BENCH = """
import json, numpy as np
from livecam.bench import camera_sink_cost
frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
print(json.dumps(camera_sink_cost(frame, 30, frames=20)))
"""


# `livecam doctor --camera`'s findings for root and for a user outside the video group (the
# venv's interpreter may not be runnable by another user, so that user is described to it)
DOCTOR = """
import json
from livecam.doctor.camera import User, camera_findings
nobody = User("nobody", 65534, frozenset({65534}))
print(json.dumps({who: [[c.name, c.ok, c.detail] for c in camera_findings(user=user)]
                  for who, user in (("root", None), ("nobody", nobody))}))
"""


def start_pulseaudio() -> None:
    """A sound server for the LiveCam Microphone (livecam and Chromium find it through
    PULSE_SERVER), with a null sink for Chromium to play into."""
    PULSE_SOCKET.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = (OUT / "pulseaudio.log").open("w")
    subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no", "--exit-idle-time=-1",
         f"--load=module-native-protocol-unix socket={PULSE_SOCKET} auth-anonymous=1",
         "--load=module-null-sink sink_name=speakers"],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    ENV["PULSE_SERVER"] = f"unix:{PULSE_SOCKET}"
    wait_for(lambda: sh("pactl", "info", env=ENV).returncode == 0, 60)


def main() -> None:
    RUN.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in ("/dev/shm/home", "/dev/shm/xdg"):
        os.makedirs(d, mode=0o700, exist_ok=True)
    start_pulseaudio()
    wanted = os.environ.get("LIVECAM_GUEST_SCENARIOS", "").split(",")
    for fn in (module, live_run, busy_device, device_returns):
        if wanted == [""] or fn.__name__ in wanted:
            scenario(fn)


if __name__ == "__main__":
    main()

"""`livecam serve --address`: joining a cluster that `ray start --head` runs, with token
authentication (Ray 2.59 and later turn it on where a token exists); it declares a GPU it lacks,
so two generator replicas must share it (they run on the CPU). Also the errors a join meets,
and Serve left on the cluster as it was found. Its own module: no other Ray cluster runs
beside it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from tests.conftest import REPO
from tests.remote_server import TOKEN, free_port, live_client, start_serve

RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """The head's address, and an environment whose HOME holds the cluster's token."""
    home = tmp_path_factory.mktemp("ray-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)  # where `ray start` writes the token, and the clients find it
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    port = free_port()
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
         str(port), "--num-cpus", "3", "--num-gpus", "1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert head.poll() is None and time.monotonic() < deadline, "ray start failed"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        _end_node(head)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


def test_two_replicas_share_the_clusters_one_gpu_and_serve_leaves_as_it_came(cluster, tmp_path):
    address, env = cluster
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    joined = {**env, "RAY_AUTH_MODE": "token"}
    port, other = free_port(), free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd's, for Type=notify
    notify.bind(str(tmp_path / "notify"))
    systemd = {**joined, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    first, shown = start_serve(token_file, port, "--address", address, "--replicas", "2",
                               "--status-every", "1", env=systemd)  # fmt: skip
    try:
        # one GPU a replica: the second could never be placed, and the pool never came up
        assert f"lite x2 at ws://127.0.0.1:{port}" in shown, shown
        # Serve runs on the cluster now, at this port: another port would be ignored
        second, out = start_serve(token_file, other, "--address", address, env=joined)
        assert second.wait(60) == 1, out
        assert f"already runs on this cluster, listening on 127.0.0.1:{port}" in out, out
        # at the same port, it would have replaced the first one's pool under its clients
        second, out = start_serve(token_file, port, "--address", address, env=joined)
        assert second.wait(60) == 1, out
        assert "another livecam serve runs on this cluster" in out, out
        assert first.poll() is None
        # and the first pool serves on
        bench = subprocess.run(
            [sys.executable, "-m", "livecam", "bench", "--remote", f"ws://127.0.0.1:{port}",
             "--token-file", str(token_file), "--streams", "2", "--soak", "3", "--json",
             "--size", "320x240"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr[-2000:]
        assert all(row["remote_frames"] > 0 for row in json.loads(bench.stdout)["per_stream"])
    finally:
        out = _stop(first)
    assert first.returncode == 0 and "shutting down" in out, out
    # while the bench ran, the server said what its pool did, a line a second
    busy = re.findall(r"livecam serve: 2 streams · ([1-9]\d*) faces/s · [\d.]+ batches/s", out)
    assert busy, out
    # and told systemd: up, and where; each status line; stopping
    notify.setblocking(False)
    told = []
    with contextlib.suppress(BlockingIOError):
        while True:
            told.append(notify.recv(4096).decode())
    notify.close()
    assert told[0] == f"READY=1\nSTATUS=lite x2 at ws://127.0.0.1:{port}", told
    assert any(re.match(r"STATUS=2 streams · [1-9]\d* faces/s", m) for m in told[1:-1]), told
    assert told[-1] == "STOPPING=1", told
    # the first run started Serve there, and shut it down: the next one listens where asked
    third, shown = start_serve(token_file, other, "--address", address, env=joined)
    out = _stop(third) if third.poll() is None else third.communicate()[0]
    assert f"at ws://127.0.0.1:{other}" in shown, shown + out
    assert third.returncode == 0, out


def test_a_join_without_the_token_or_to_no_cluster_says_what_to_do(cluster, tmp_path):
    address, env = cluster
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc, out = start_serve(token_file, free_port(), "--address", address, env=env)
    assert proc.wait(120) == 1, out
    assert "asks for its token: run with RAY_AUTH_MODE=token" in out, out
    assert "Traceback" not in out
    nothing = f"127.0.0.1:{free_port()}"
    proc, out = start_serve(token_file, free_port(), "--address", nothing, env=env)
    assert proc.wait(60) == 1, out
    assert f"cannot join the Ray cluster at {nothing}: Connection refused" in out, out


def test_serve_without_an_address_starts_a_cluster_of_its_own_beside_this_one(cluster, tmp_path):
    """Ray joins the newest `ray start` cluster on the machine unless told otherwise: livecam
    serve without --address failed on that (num_cpus with an existing cluster)."""
    _, env = cluster
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    proc, shown = start_serve(token_file, port, env=env)
    out = _stop(proc) if proc.poll() is None else proc.communicate()[0]
    assert f"lite x1 at ws://127.0.0.1:{port}" in shown, shown + out
    assert proc.returncode == 0, out


def test_replicas_that_fail_to_start_say_why_and_leave_the_cluster_as_it_was(cluster, tmp_path):
    """The replicas' machines lack the weights (here, the folder is empty): Serve gives up on
    them and says only that the deployment failed; livecam says why, and takes the failed
    application off the cluster (the next pool deploys there as if it had not been)."""
    address, env = cluster
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    joined = {**env, "RAY_AUTH_MODE": "token"}
    (tmp_path / "empty").mkdir()
    proc, out = start_serve(token_file, free_port(), "--address", address, "--engine", "musetalk",
                            "--models-dir", str(tmp_path / "empty"), env=joined)  # fmt: skip
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert "error: the pool did not start: MuseTalk weights missing in" in out, out
    assert "livecam models download" in out
    port = free_port()
    again, shown = start_serve(token_file, port, "--address", address, env=joined)
    out = _stop(again) if again.poll() is None else again.communicate()[0]
    assert f"lite x1 at ws://127.0.0.1:{port}" in shown, shown + out
    assert again.returncode == 0, out


def test_a_musetalk_pool_follows_the_clusters_gpus_under_a_running_stream(cluster, tmp_path):
    """A GPU machine joins (`ray start --address`, here a second node on this machine that
    declares a GPU): the pool starts a second replica, and the stream already running keeps
    its connection (a new deployment would have restarted every replica under it). The
    machine leaves: the pool says so and the stream goes on, on the replica left."""
    address, env = cluster
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    joined = {**env, "RAY_AUTH_MODE": "token"}
    proc, shown = start_serve(token_file, free_port(), "--address", address, "--engine",
                              "musetalk", "--random-weights", "--tiny", "--status-every", "1",
                              env=joined)  # fmt: skip
    out, worker = Output(proc), None
    try:
        assert "x1 (one per GPU, as GPU machines join and leave) at" in shown, shown
        url = re.search(r"at (ws://\S+)", shown)[1]
        with live_client(url, token_file) as client:
            out.wait_for("livecam serve: 1 stream · ", 60)
            worker = subprocess.Popen(
                [str(RAY), "start", "--address", address, "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "1", "--num-gpus", "1", "--block", "--disable-usage-stats"],
                env=joined, start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            joined_at = time.monotonic()
            out.wait_for("livecam serve: 2 generator replicas (were 1) · 1 stream", 180)
            grew_s = time.monotonic() - joined_at
            link = client.engine.link.stats
            grown = link.remote_frames
            assert link.reconnects == 0  # the stream kept its connection through the change
            _end_node(worker)
            left_at = time.monotonic()
            out.wait_for("livecam serve: 1 generator replica (were 2) · 1 stream", 120)
            left, shrank_s = link.remote_frames, time.monotonic() - left_at
            out.wait_for("livecam serve: 1 stream · ", 30)  # a status period on one replica
            time.sleep(3)
            assert link.remote_frames > left > grown > 0, (grown, left, link.remote_frames)
            print(f"\nreplica added {grew_s:.1f} s after `ray start`, gone {shrank_s:.1f} s after "
                  f"the node stopped; remote faces {grown}, {left}, {link.remote_frames}, "
                  f"{link.reconnects} reconnects")  # fmt: skip
    finally:
        if worker is not None:
            _end_node(worker)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    said = shown + out.text()
    assert proc.returncode == 0, said
    assert "Cannot deregister autoscaling state" not in said  # Serve's noise, avoided


class Output:
    """A process's output, read as it comes, searched from where the last search ended."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._seen = 0
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._seen, len(self.lines)):
                if text in self.lines[i]:
                    self._seen = i + 1
                    return
            assert time.monotonic() < deadline, f"no {text!r} in {timeout:.0f} s:\n{self.text()}"
            time.sleep(0.2)

    def text(self) -> str:
        self._reader.join(5)
        return "".join(self.lines)


def _end_node(node: subprocess.Popen) -> None:
    """`ray start --block` ended: it stops its node's processes (the machine leaves)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

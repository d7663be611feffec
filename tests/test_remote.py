"""Remote generation without Ray: wire protocol, tokens, per-stream state, the stateless
generator, and the client's fallback when no server answers."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import types

import numpy as np
import pytest

from livecam.audio.files import read_audio
from livecam.audio.ring import AudioRing
from livecam.avatar.store import load_avatar
from livecam.engines.lite import LiteEngine, MouthTrack
from livecam.remote import protocol as wire
from livecam.remote.client import Link, RemoteError, open_remote, stream_url
from livecam.remote.generator import LiteGenerator, RenderRequest, paste
from livecam.remote.stream import StreamState
from livecam.remote.tokens import TokenError, read_token
from tests.conftest import JFK, REPO


@pytest.fixture(scope="module")
def astronaut():
    return load_avatar("astronaut")


def test_client_side_imports_neither_ray_nor_torch():
    code = (
        "import sys, livecam.cli, livecam.live, livecam.remote.client;"
        "print(sorted(m for m in ('ray', 'torch', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]"


# -- protocol -----------------------------------------------------------------------------------
def test_messages_round_trip_and_malformed_ones_are_refused():
    header, payload = wire.unpack(wire.pack({"type": "audio", "start": 5}, b"abcd"))
    assert header == {"type": "audio", "start": 5} and payload == b"abcd"
    bad = [
        "text",
        b"\x00\x00",
        b"\x00\x00\x00\x10{}",  # header length past the message
        b"\x00\x00\x00\x02[]",  # not an object
        b"\x00\x00\x00\x02{}",  # no type
        b"\x00\x00\x00\x03{x}",  # not JSON
        b"\xff\xff\xff\xff" + b"x" * 10,  # header over the limit
        b"\x00" * (wire.MAX_MESSAGE + 1),
    ]
    for data in bad:
        with pytest.raises(wire.ProtocolError):
            wire.unpack(data)


@pytest.mark.parametrize(
    "frames", [[], [3, 2], [1, 1], [-1], [True], ["1"], list(range(wire.MAX_FRAMES + 1))]
)
def test_frame_lists_must_be_short_increasing_integers(frames):
    with pytest.raises(wire.ProtocolError):
        wire.frame_list({"frames": frames})


def test_audio_payload_limits():
    assert len(wire.audio_samples(np.zeros(10, "<f4").tobytes())) == 10
    for payload in (b"", b"abc", np.full(3, np.nan, "<f4").tobytes(),
                    np.zeros(wire.MAX_AUDIO_SAMPLES + 1, "<f4").tobytes()):  # fmt: skip
        with pytest.raises(wire.ProtocolError):
            wire.audio_samples(payload)


def test_avatar_upload_round_trips_and_damage_is_detected(astronaut):
    sha, blob = wire.avatar_blob(astronaut)
    back = wire.avatar_from_blob(blob, sha)
    assert np.array_equal(back.image, astronaut.image)
    assert np.array_equal(back.mouth.patches, astronaut.mouth.patches)
    assert wire.avatar_blob(astronaut)[0] == sha  # the hash is of content, not npz timestamps
    with pytest.raises(wire.ProtocolError, match="sha256"):
        wire.avatar_from_blob(blob, "0" * 64)
    with pytest.raises(wire.ProtocolError, match="npz"):
        wire.avatar_from_blob(blob[: len(blob) // 2], sha)
    shifted = dataclasses.replace(astronaut.mouth, x=astronaut.image.shape[1])
    moved = dataclasses.replace(astronaut, mouth=shifted)
    sha2, blob2 = wire.avatar_blob(moved)
    with pytest.raises(wire.ProtocolError, match="outside"):
        wire.avatar_from_blob(blob2, sha2)


def test_patches_encode_exactly_raw_and_closely_as_jpeg(astronaut):
    patch = astronaut.mouth.patches[5, 1]
    h, w = patch.shape[:2]
    raw = wire.encode_patch(patch, "raw")
    assert np.array_equal(wire.decode_patch(raw, w, h, "raw"), patch)
    jpeg = wire.encode_patch(patch, "jpeg")
    assert len(jpeg) < len(raw) / 4
    assert np.abs(wire.decode_patch(jpeg, w, h, "jpeg").astype(int) - patch).mean() < 3
    with pytest.raises(wire.ProtocolError):
        wire.decode_patch(raw[:-1], w, h, "raw")
    with pytest.raises(wire.ProtocolError):
        wire.decode_patch(b"not a jpeg", w, h, "jpeg")


# -- tokens -------------------------------------------------------------------------------------
def test_token_file_is_created_private_and_read_back(tmp_path):
    path = tmp_path / "token"
    token = read_token(path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_token(path) == token and len(token) >= 32
    with pytest.raises(TokenError, match="not found"):
        read_token(tmp_path / "missing")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(TokenError, match="16"):
        read_token(tmp_path / "short")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_is_named_with_its_fix(tmp_path, caplog, mode):
    path = tmp_path / "token"
    path.write_text("t" * 32 + "\n")
    path.chmod(mode)
    with caplog.at_level("WARNING", logger="livecam.remote.tokens"):
        assert read_token(path) == "t" * 32  # still used
    assert caplog.messages == [
        f"the token file {path} can be read by other users (mode {mode:04o}): chmod 600 {path}"
    ]
    path.chmod(0o600)
    caplog.clear()
    read_token(path)
    assert not caplog.messages


# -- server side without Ray --------------------------------------------------------------------
def test_stream_state_keeps_the_sample_clock_through_gaps_and_resends():
    state = StreamState(1, 30.0, "raw", True, "lite", ("full",), MouthTrack(30.0).samples_needed)
    state.add_audio(0, np.ones(100, "<f4").tobytes())
    state.add_audio(50, np.full(100, 2, "<f4").tobytes())  # overlap: only new samples kept
    state.add_audio(400, np.full(10, 3, "<f4").tobytes())  # gap: silence in between
    ring = state.ring
    assert ring.end == 410
    assert ring.read(0, 100).tolist() == [1] * 100 and ring.read(100, 150).tolist() == [2] * 50
    assert not ring.read(150, 400).any() and ring.read(400, 410).tolist() == [3] * 10
    with pytest.raises(wire.ProtocolError, match="needs audio"):
        state.conditions([30])


def test_generator_renders_each_request_on_its_own_avatar(astronaut):
    portrait = load_avatar("portrait")
    gen = LiteGenerator(capacity=1)
    fps = 30.0
    req = [RenderRequest(1, "a", (0, 1), ((0.8, 0.5), (0.2, 0.0)), "full", fps, True),
           RenderRequest(2, "b", (7,), ((0.5, -0.5),), "full", fps, True)]  # fmt: skip
    gen.prepare(req[0], astronaut)
    gen.prepare(req[1], portrait)
    assert not gen.has(req[0])  # the LRU held one
    gen.prepare(req[0], astronaut)
    with pytest.raises(KeyError):
        gen.render(req)
    gen.capacity = 2
    gen.prepare(req[1], portrait)
    results = gen.render(req)
    assert [r.stream for r in results] == [1, 2]
    assert results[0].batch_streams == 2 and results[0].batch_frames == 3
    for avatar, request, result in zip((astronaut, portrait), req, results, strict=True):
        local = LiteEngine(avatar, fps)
        for k, mouth, patches in zip(
            request.frames, request.conditions, result.patches, strict=True
        ):
            assert np.array_equal(paste(avatar.image, patches), local.face(k, *mouth))


# -- client fallback ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_local_frames_with_a_warning(astronaut):
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(RemoteError, match="cannot reach"):
        open_remote(url, "t" * 32, astronaut, LiteEngine(astronaut, 30.0), remote_only=True)
    engine = open_remote(url, "t" * 32, astronaut, LiteEngine(astronaut, 30.0))
    try:
        assert "local lite frames" in engine.warnings[0]
        audio = read_audio(JFK)[: 16000 * 2]
        ring = AudioRing(len(audio))
        ring.write(audio)
        faces = engine.generate(ring, [10, 11, 12])
        local = LiteEngine(astronaut, 30.0).generate(ring, [10, 11, 12])
        assert all(np.array_equal(a, b) for a, b in zip(faces, local, strict=True))
        assert engine.link.stats.local_frames == 3
    finally:
        engine.close()


def test_the_round_trip_is_the_networks_not_its_queues(astronaut):
    url = f"ws://127.0.0.1:{_free_port()}"
    engine = open_remote(url, "t" * 32, astronaut, LiteEngine(astronaut, 30.0))
    try:
        assert engine.round_trip_s() is None  # nothing measured yet
        rtts = engine.link.stats.rtt_s
        rtts.extend([0.113, 0.140, 0.125])
        assert engine.round_trip_s() == 0.113
        rtts.extend([0.6, 0.9])  # calls queued at a busy server: not the network's
        assert engine.round_trip_s() == 0.113
    finally:
        engine.close()


@pytest.mark.parametrize("url", ["http://x:1", "ws://", "nonsense"])
def test_bad_remote_addresses_are_refused(url):
    with pytest.raises(RemoteError, match="ws://HOST:PORT"):
        stream_url(url)


def test_stream_url_adds_the_path():
    assert stream_url("ws://h:1") == "ws://h:1" + wire.PATH
    assert stream_url("ws://h:1/") == "ws://h:1" + wire.PATH
    assert stream_url("wss://h/mt") == "wss://h/mt" + wire.PATH
    assert stream_url("ws://h:1" + wire.PATH) == "ws://h:1" + wire.PATH


@pytest.mark.parametrize("fps", [30.0, 25.0, 29.97, 24.0, 60.0, 12.5])
def test_the_look_ahead_table_reproduces_the_engine_at_any_frame(fps):
    track = MouthTrack(fps)
    needed = wire.needed_from_table(
        json.loads(json.dumps(wire.needed_table(track.samples_needed, fps)))
    )
    assert all(needed(k) == track.samples_needed(k) for k in range(0, 20000, 7))


def test_malformed_look_ahead_tables_are_refused():
    bad_tables = [
        None,
        {},
        {"period": 2, "shift": 10, "table": [1]},
        {"period": 1, "shift": 0, "table": [1]},
        {"period": 1, "shift": 5, "table": ["1"]},
    ]
    for bad in bad_tables:
        with pytest.raises(wire.ProtocolError):
            wire.needed_from_table(bad)


def test_start_with_remote_but_no_token_file_says_so():
    from typer.testing import CliRunner

    from livecam.cli import app

    result = CliRunner().invoke(
        app, ["start", "--remote", "ws://127.0.0.1:9", "--sink", "memory", "--no-dashboard"]
    )
    assert result.exit_code == 1
    assert "--remote needs --token-file" in result.output


def test_start_remote_only_exits_when_the_server_is_unreachable(tmp_path):
    from typer.testing import CliRunner

    from livecam.cli import app

    token = tmp_path / "token"
    token.write_text("t" * 32)
    url = f"ws://127.0.0.1:{_free_port()}"
    args = ["--remote", url, "--token-file", str(token), "--remote-only", "--sink", "memory",
            "--audio", str(JFK)]  # fmt: skip
    result = CliRunner().invoke(app, ["start", *args, "--no-dashboard"])
    assert result.exit_code == 1
    assert "cannot reach the livecam server" in result.output


@pytest.mark.parametrize("command", ["start", "render", "bench"])
def test_a_bad_remote_connections_value_is_refused(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from livecam.cli import app

    extra = {"render": ["--audio", str(JFK), "--out", str(tmp_path / "a.mp4")]}.get(command, [])
    args = [command, *extra, "--remote", "ws://127.0.0.1:9", "--remote-connections", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "'3' is not one of auto, 1, 2" in result.output and "Traceback" not in result.output
    config = tmp_path / "config.toml"  # the same check for the config file's key
    config.write_text(f"[{command}]\nremote-connections = true\n")
    monkeypatch.setenv("LIVECAM_CONFIG", str(config))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    assert f"[{command}] remote-connections = True: 'true' is not one of" in result.output
    assert str(config) in result.output


def test_remote_connections_auto_is_two_over_a_network_and_one_on_loopback():
    from livecam.remote.client import Link, auto_connections

    assert auto_connections("ws://127.0.0.1:8765") == auto_connections("ws://localhost:1") == 1
    assert auto_connections("ws://[::1]:8765/") == 1
    assert auto_connections("ws://192.168.1.20:8765") == auto_connections("wss://gpu.example") == 2
    with pytest.raises(RemoteError, match="is not a ws://HOST:PORT"):
        auto_connections("http://gpu.example")
    with pytest.raises(ValueError, match="connections must be 1 or 2"):
        Link("ws://127.0.0.1:9", "t", 30.0, True, connections=3)


def test_connections_lost_soon_after_they_are_made_are_tried_again_ever_more_slowly(
    monkeypatch,
):
    """A server that refuses each request (the connection is lost at once, again and again)
    is not hammered: each quick loss starts the next backoff a step further up, to its top;
    a connection that held a while starts it from the bottom again."""
    from livecam.remote import client

    link = Link("ws://127.0.0.1:9", "t" * 32, 30.0, True, connections=1)
    ready = {"stream": 1}
    monkeypatch.setattr(link, "_open", lambda: (types.SimpleNamespace(close=lambda: None),
                                               ready, object()))  # fmt: skip
    waits: list[float] = []
    monkeypatch.setattr(link._closed, "wait", lambda s: waits.append(s) or False)

    def lose(held_s: float) -> None:
        link._connected_at -= held_s
        link._lose(link._conn, ConnectionError("refused"))
        link._reconnecting.join(5)
        assert link._conn is not None

    link.connect()
    for _ in range(6):
        lose(0.1)
    lose(client.STEADY_S + 1)
    lose(0.1)
    b = client.BACKOFF_S
    assert waits == [b[1], b[2], b[3], b[4], b[4], b[4], b[0], b[1]]
    assert link.stats.reconnects == 8


def test_a_garbled_reply_is_refused_not_pasted():
    from livecam.remote.client import _decode

    shape = (100, 80, 3)
    patch = np.full((4, 5, 3), 7, np.uint8)
    good = {"patches": [[0, 10, 20, 5, 4, patch.nbytes]], "encoding": "raw"}
    (patches,) = _decode(good, patch.tobytes(), 1, shape)
    assert patches[0][:2] == (10, 20) and np.array_equal(patches[0][2], patch)
    bad_indices = [
        [[1, 10, 20, 5, 4, patch.nbytes]],  # another frame than asked for
        [[0, 78, 20, 5, 4, patch.nbytes]],  # past the avatar's right edge
        [[0, -1, 20, 5, 4, patch.nbytes]],
        [[0, 10, 20, 5, 4, patch.nbytes + 1]],  # past the payload
        [[0, 10, 20, 6, 4, patch.nbytes]],  # size does not match
        [[0, 10, 20, 5, 4]],
        [["0", 10, 20, 5, 4, patch.nbytes]],
    ]
    for index in bad_indices:
        with pytest.raises(wire.ProtocolError):
            _decode({"patches": index, "encoding": "raw"}, patch.tobytes(), 1, shape)


def test_auto_encoding_is_raw_only_for_the_servers_own_host() -> None:
    here = "a" * 32
    assert wire.resolve_encoding("auto", here, here) == "raw"
    assert wire.resolve_encoding("auto", "b" * 32, here) == "jpeg"
    assert wire.resolve_encoding("auto", None, here) == "jpeg"
    assert wire.resolve_encoding("auto", "", "") == "jpeg"  # neither knows its machine
    assert wire.resolve_encoding("raw", "b" * 32, here) == "raw"  # asked for: as asked
    assert wire.resolve_encoding("jpeg", here, here) == "jpeg"


def test_the_host_id_is_the_machine_and_its_boot(tmp_path, monkeypatch) -> None:
    machine, boot = tmp_path / "machine-id", tmp_path / "boot_id"
    machine.write_text("0123456789abcdef0123456789abcdef\n")
    boot.write_text("5b1e0c6e-0000-4000-8000-000000000001\n")
    monkeypatch.setattr(wire, "HOST_FILES", (str(machine), str(boot)))
    first = wire.host_id()
    assert first == wire.host_id() and len(first) == 32
    boot.write_text("5b1e0c6e-0000-4000-8000-000000000002\n")  # a clone, booted apart
    assert wire.host_id() not in ("", first)
    machine.unlink()
    assert wire.host_id() not in ("", first)  # the boot id alone still tells machines apart
    boot.unlink()
    assert wire.host_id() == ""

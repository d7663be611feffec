"""Caches stay whole: concurrent and killed writers, leftovers, damaged manifests, symlinks,
a full disk (the file sink's temporaries: test_file_sink_temps.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from livecam.avatar import cachedir, store
from livecam.avatar.store import AvatarError, list_avatars, load_avatar, remove_avatar
from tests.conftest import REPO

PHOTO = REPO / "avatars" / "portrait" / "portrait.jpg"


@pytest.fixture(scope="module")
def built():
    return store.build_avatar("me", PHOTO)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built) -> Path:
    """A private cache holding the prepared avatar "me"."""
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    store._write_cache(built, PHOTO, "prepared", "")
    return tmp_path / "cache" / "avatars"


def _hidden(root: Path, name: str = "me") -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith(f".{name}")}


def _version(root: Path) -> str:
    return os.readlink(root / "me")


def test_a_rebuild_swaps_one_pointer_and_leaves_nothing(cache, built):
    first = _version(cache)
    store._write_cache(built, PHOTO, "prepared", "")
    assert _version(cache) != first
    assert _hidden(cache) == {_version(cache), ".me~lock"}  # the old version is gone
    assert load_avatar("me").image.shape == built.image.shape


def test_concurrent_writers_queue_on_the_lock(cache, built):
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store._write_cache(built, PHOTO, "prepared", "")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert _hidden(cache) == {_version(cache), ".me~lock"}
    assert [a.status for a in list_avatars() if a.name == "me"] == ["ready"]


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=os.environ.copy())  # fmt: skip


def test_two_prepare_force_processes_leave_one_good_cache(cache, built):
    cmd = [sys.executable, "-m", "livecam", "avatars", "prepare", "me", "--from", str(PHOTO),
           "--force"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO) for _ in range(2)]  # fmt: skip
    outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert all("Traceback" not in out for out in outputs)
    assert _hidden(cache) == {_version(cache), ".me~lock"}
    assert [a.status for a in list_avatars() if a.name == "me"] == ["ready"]
    assert load_avatar("me").image.shape == built.image.shape


# A writer killed (SIGKILL) at each step of a rebuild: monkeypatched in the child only.
KILL = "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
AFTER = "lambda real: lambda *a, **k: (real(*a, **k), os.kill(os.getpid(), signal.SIGKILL))"
KILL_POINTS = {
    "after the arrays": f"cachefile.save_arrays = ({AFTER})(cachefile.save_arrays)",
    "before the swap": f"cachedir.publish = {KILL}",
    "link made, not swapped": f"cachedir.os.symlink = ({AFTER})(os.symlink)",
    "swapped, not cleaned": f"cachedir.clean = {KILL}",
    "older layout exchanged": f"cachedir._exchange = ({AFTER})(cachedir._exchange)",
}
KILLED_WRITER = """
import os, signal, sys
from livecam import cachefile
from livecam.avatar import cachedir, store
avatar = store.load_avatar("me")
exec(sys.argv[1])
store._write_cache(avatar, store.Path(store._read_manifest("me")["source"]), "prepared", "")
"""


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_writer_killed_at_any_step_loses_nothing(cache, built, point):
    if point == "older layout exchanged":  # a cache in the layout before versions
        version = cache / _version(cache)
        (cache / "me").unlink()
        version.rename(cache / "me")
    proc = _run(sys.executable, "-c", KILLED_WRITER, KILL_POINTS[point])
    assert proc.returncode == -9, proc.stderr[-1000:]
    assert cachedir.live_dir(cache, "me") is not None  # the avatar never vanished
    assert [(a.name, a.status) for a in list_avatars() if a.kind != "bundled"] == [
        ("me", "ready")]  # leftovers are not listed  # fmt: skip
    assert load_avatar("me").image.shape == built.image.shape
    store._write_cache(built, PHOTO, "prepared", "")  # the next write cleans up
    assert _hidden(cache) == {_version(cache), ".me~lock"}


def test_without_rename_exchange_the_older_layout_is_still_replaced(cache, built, monkeypatch):
    version = cache / _version(cache)
    (cache / "me").unlink()
    version.rename(cache / "me")
    monkeypatch.setattr(cachedir.ctypes, "CDLL", lambda *a, **k: object())  # no renameat2
    real_replace = os.replace

    def fails(src, dst):  # only the pointer's rename (the arrays' one goes through)
        if "~link-" in str(src):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(cachedir.os, "replace", fails)
    with pytest.raises(AvatarError, match="Input/output error"):
        store._write_cache(built, PHOTO, "prepared", "")
    assert (cache / "me").is_dir() and not (cache / "me").is_symlink()  # put back
    monkeypatch.setattr(cachedir.os, "replace", real_replace)
    store._write_cache(built, PHOTO, "prepared", "")
    assert (cache / "me").is_symlink()
    assert _hidden(cache) == {_version(cache), ".me~lock"}


def test_leftovers_of_the_old_writer_are_ignored_and_cleaned(cache, built):
    for name in (".me.old-4242", ".me.tmp-abcd1234"):
        (cache / name).mkdir()
        (cache / name / "arrays.npz").write_bytes(b"x" * 1000)
    (cache / ".stray").mkdir()
    names = [a.name for a in list_avatars()]
    assert "me" in names and not any(n.startswith(".") for n in names)
    from livecam.doctor import _avatars

    assert "me (ready)" in _avatars().detail
    store._write_cache(built, PHOTO, "prepared", "")
    assert _hidden(cache) == {_version(cache), ".me~lock"}
    remove_avatar("me")
    assert _hidden(cache) == {".me~lock"} and not (cache / "me").exists()


def test_an_older_plain_folder_cache_is_read_and_replaced(cache, built):
    version = cache / _version(cache)
    (cache / "me").unlink()
    version.rename(cache / "me")  # the layout before versions: a plain folder
    assert load_avatar("me").image.shape == built.image.shape
    store._write_cache(built, PHOTO, "prepared", "")
    assert (cache / "me").is_symlink()
    assert _hidden(cache) == {_version(cache), ".me~lock"}


@pytest.mark.parametrize("content", ["[]", '{"source": 5}', '{"format_version": 1, "kin', ""])
def test_a_damaged_manifest_is_a_clear_error_not_a_crash(cache, content):
    (cache / "me" / "manifest.json").write_text(content)
    assert [(a.name, a.status) for a in list_avatars() if a.name == "me"] == [("me", "damaged")]
    with pytest.raises(AvatarError, match=r"cache of avatar 'me' .* is damaged.*--force"):
        load_avatar("me")
    if content == "[]":  # (one rebuild is enough: it detects the face again, slowly)
        store.prepare_avatar("me", PHOTO, force=True)  # the advice works
        assert [a.status for a in list_avatars() if a.name == "me"] == ["ready"]


def test_a_damaged_bundled_manifest_is_rebuilt(tmp_path, monkeypatch, built):
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    store._write_cache(replace(built, name="portrait"), PHOTO, "bundled", "")
    assert [a.status for a in list_avatars() if a.name == "portrait"] == ["ready"]
    (tmp_path / "cache" / "avatars" / "portrait" / "manifest.json").write_text("[]")
    assert [a.status for a in list_avatars() if a.name == "portrait"] == ["damaged"]
    assert load_avatar("portrait").name == "portrait"  # rebuilt from the bundled photo
    assert [a.status for a in list_avatars() if a.name == "portrait"] == ["ready"]


def test_a_symlink_out_of_the_cache_is_never_followed(cache, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(cache / _version(cache), outside)  # a complete, valid-looking cache
    cachedir.discard(cache, "me")
    (cache / "me").symlink_to(outside)
    assert "me" not in [a.name for a in list_avatars()]
    with pytest.raises(AvatarError, match="unknown avatar 'me'"):
        load_avatar("me")
    remove_avatar("me")  # removes the link, not what it points at
    assert not (cache / "me").is_symlink() and (outside / "manifest.json").is_file()


def test_a_symlink_in_a_bundled_name_is_replaced_not_written_through(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "cache" / "avatars"
    root.mkdir(parents=True)
    (root / "portrait").symlink_to(outside)
    load_avatar("portrait")
    assert list(outside.iterdir()) == []
    assert cachedir.live_dir(root, "portrait").parent == root


def test_disk_full_during_prepare_is_one_line_and_keeps_the_cache(cache, built, monkeypatch):
    before = _version(cache)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.np, "savez", full)
    with pytest.raises(AvatarError, match="no space left to save avatar 'me'"):
        store._write_cache(built, PHOTO, "prepared", "")
    monkeypatch.undo()
    assert _version(cache) == before and _hidden(cache) == {before, ".me~lock"}


DISK_FULL = """
mount -t tmpfs -o size="$1" tmpfs "$2" && cp -a "$3/." "$2/" || exit 99
export LIVECAM_CACHE_DIR="$2"
"$4" -m livecam avatars prepare me --from "$5" --force
echo "rc=$?"
ls -A "$2/avatars"
"$4" -c "$6"
"""


LIST = "from livecam.avatar import store; print([(a.name, a.status) for a in store.list_avatars()])"


def _namespace() -> list[str]:
    """A private mount namespace (a tmpfs there is gone with the child), or skip."""
    cmd = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if shutil.which("unshare") is None or _run(*cmd, "true", timeout=10).returncode != 0:
        pytest.skip("needs unshare(1) and mount namespaces for a real small filesystem")
    return cmd


def test_a_really_full_disk_is_one_line_and_keeps_the_cache(cache, tmp_path):
    namespace = _namespace()
    used = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    size = f"{used // 1024 + 1024}k"  # room for the cache there, not for a second one
    mount = tmp_path / "small"
    mount.mkdir()
    proc = _run(*namespace, "sh", "-c", DISK_FULL, "sh", size, str(mount), str(cache.parent),
                sys.executable, str(PHOTO), LIST)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "rc=1" in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left to save avatar 'me'" in errors[0], out
    assert "Traceback" not in out
    listing = out.split("rc=1", 1)[1].split()
    assert listing[:3] == [".me~lock", _version(cache), "me"], out  # the old one, no temporaries
    assert "('me', 'ready')" in out, out


@pytest.mark.parametrize("name", ["x\n", "astronaut\n", ".hidden", "a~v-1", "../x", "a/b"])
def test_names_are_matched_whole(name):
    with pytest.raises(AvatarError, match="invalid avatar name"):
        store.avatar_dir(name)


def test_musetalk_latents_are_written_through_temporaries(cache):
    from livecam.engines.musetalk import avatar_latents as al

    data = al.AvatarLatents((1, 2, 30, 40), np.zeros((256, 256, 3), np.uint8),
                            np.ones((1, 8, 32, 32), np.float32),
                            np.zeros((38, 29, 1), np.float32))  # fmt: skip
    key = {"format_version": al.FORMAT_VERSION, "vae": "test"}
    al._save("me", key, data)
    folder = cachedir.live_dir(cache, "me")
    assert sorted(p.name for p in folder.iterdir()) == [
        "arrays.npz", "manifest.json", "musetalk.json", "musetalk.npz"]  # fmt: skip
    loaded = al._load(folder, key)
    assert loaded is not None and loaded.box == (1, 2, 30, 40)
    manifest = json.loads((folder / al.MANIFEST).read_text())
    sums = manifest["arrays"]
    damaged = [[], {}, {**manifest, "arrays": 5}, {**manifest, "key": []},
               {**manifest, "arrays": {"box": sums["box"]}},
               {**manifest, "arrays": {**sums, "box": 5}}]  # fmt: skip
    for value in damaged:  # damaged: rebuilt, never a crash
        text = json.dumps(value)
        (folder / al.MANIFEST).write_text(text)
        assert al._load(folder, key) is None, text


@pytest.mark.parametrize("memo", ["[]", '"x"', '{"k": 5}', "{", '{"k": "../../x"}'])
def test_a_damaged_weights_hash_memo_is_started_again(tmp_path, monkeypatch, memo):
    from livecam.engines.musetalk import weights

    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    weights.weights_cache_dir().mkdir(parents=True)
    memo_path = weights.weights_cache_dir() / "hashes.json"
    memo_path.write_text(memo)
    digest = weights.cached_sha256(PHOTO)
    assert digest == store.sha256_file(PHOTO)
    assert list(json.loads(memo_path.read_text()).values()) == [digest]


def test_an_unwritable_weights_cache_still_gives_the_hash(tmp_path, monkeypatch, caplog):
    from livecam.engines.musetalk import weights

    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path))
    (tmp_path / "weights").write_text("a file where the folder should be")
    assert weights.cached_sha256(PHOTO) == store.sha256_file(PHOTO)
    assert "could not remember the hash" in caplog.text


DAMAGED_TOML = [
    b"source = 5",
    b'description = "no source"',
    b'source = "p.jpg"\nfaces = 2\n[x',
    b'source = "p.jpg"\ndescription = true',
    b'source = "p.jpg"\ndescription = []',
    b'source = "\xff"',
]


@pytest.mark.parametrize("toml", DAMAGED_TOML)
def test_a_damaged_bundled_avatar_toml_is_named(tmp_path, monkeypatch, toml):
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(tmp_path / "bundled"))
    (tmp_path / "bundled" / "bad").mkdir(parents=True)
    (tmp_path / "bundled" / "bad" / "avatar.toml").write_bytes(toml)
    assert [(a.name, a.status) for a in list_avatars()] == [("bad", "damaged")]
    with pytest.raises(AvatarError, match=r"bad/avatar.toml"):
        load_avatar("bad")

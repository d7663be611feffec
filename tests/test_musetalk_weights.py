"""Safe loading, the safetensors cache, missing files, download and verify (tiny weights)."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from livecam.cli import app
from livecam.engines.musetalk import download, weights
from livecam.engines.musetalk.manifest import COMPONENTS, missing_files
from livecam.engines.musetalk.models import MissingWeights, load_models
from livecam.session import EngineError, build_engine
from tests.helpers import TouchingPickle
from tests.musetalk_tiny import publish_tiny_hashes, tiny_models_dir, tiny_vae, write_legacy_vae


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_models_dir()


@pytest.mark.parametrize("legacy", [False, True])
def test_tampered_pickle_is_refused_and_never_executed(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "unet.pth"
    payload = {"w": torch.zeros(2), "x": TouchingPickle(marker)}
    if legacy:
        with path.open("wb") as fh:
            pickle.dump(payload, fh)
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(weights.WeightsError, match="refused to load"):
        weights.load_state_dict(path, lambda _: None)
    assert not marker.exists(), "the pickle payload ran"


def test_non_tensor_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(weights.WeightsError, match="non-tensor"):
        weights.load_state_dict(path, lambda _: None)


def test_pickle_converted_once_to_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    torch.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1)}, path)
    first: list[dict] = []
    weights.load_state_dict(path, first.append)
    assert torch.equal(first[0]["a"], torch.arange(6.0).reshape(2, 3))
    cached = weights.weights_cache_dir() / f"{weights.sha256_file(path)}.safetensors"
    assert cached.is_file()
    assert set(load_file(cached)) == {"a", "b"}
    # poison the cache file itself: a second load must come from it, not from the pickle
    save_file({"poison": torch.zeros(1)}, str(cached))
    again: list[dict] = []
    weights.load_state_dict(path, again.append)
    assert set(again[0]) == {"poison"}
    path.write_bytes(b"no longer a pickle")  # a changed source has another sha256: no reuse
    with pytest.raises(weights.WeightsError, match="refused to load"):
        weights.load_state_dict(path, again.append)


def test_tied_and_transposed_tensors_are_converted(tmp_path: Path) -> None:
    """Mapped from the pickle, tensors sharing a storage (tied weights) or not contiguous are
    what safetensors refuses: those are copied for the conversion, and nothing is lost."""
    path = tmp_path / "w.bin"
    w = torch.arange(12.0).reshape(3, 4)
    torch.save({"a": w, "tied": w, "t": w.t(), "empty": torch.zeros(0), "e2": torch.zeros(0)}, path)
    weights.load_state_dict(path, lambda state: None)
    cached = load_file(weights.weights_cache_dir() / f"{weights.sha256_file(path)}.safetensors")
    assert torch.equal(cached["tied"], w) and torch.equal(cached["t"], w.t())
    assert set(cached) == {"a", "tied", "t", "empty", "e2"}


@pytest.mark.parametrize("damage", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_safetensors_cache_is_converted_again(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / "w.bin"
    torch.save({"a": torch.arange(4.0)}, path)
    weights.load_state_dict(path, lambda state: None)
    cached = weights.weights_cache_dir() / f"{weights.sha256_file(path)}.safetensors"
    cached.write_bytes(damage)
    again: list[dict] = []
    weights.load_state_dict(path, again.append)
    assert torch.equal(again[-1]["a"], torch.arange(4.0))
    assert torch.equal(load_file(cached)["a"], torch.arange(4.0))  # the cache was rewritten


def test_vae_with_diffusers_0_4_attention_names_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    vae = tiny_vae().eval()
    write_legacy_vae(vae, tmp_path / "sd-vae")
    stored = torch.load(tmp_path / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert "decoder.mid_block.attentions.0.query.weight" in stored  # the release's old names
    loaded = weights.load_vae(tmp_path)
    latent = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded.decode(latent).sample, vae.decode(latent).sample)


def test_missing_weights_give_one_clear_message(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(MissingWeights, match="livecam models download"):
        load_models(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(tiny, partial)
    (partial / "sd-vae" / "diffusion_pytorch_model.bin").unlink()
    assert [p.name for p in missing_files(partial)] == ["diffusion_pytorch_model.bin"]
    from livecam.avatar.store import load_avatar
    from livecam.engines.musetalk.engine import MuseTalkOptions

    with pytest.raises(EngineError, match="livecam models download") as err:
        build_engine("musetalk", load_avatar("astronaut"), 25, options=MuseTalkOptions(partial))
    assert "sd-vae/diffusion_pytorch_model.bin" in str(err.value)


def _local_fetch(source: Path, calls: list[str]):
    """A stand-in for hf_hub_download serving files from a local folder."""

    def fetch(repo_id: str, filename: str, revision: str | None, local_dir: Path) -> str:
        comp = next(c for c in COMPONENTS if c.repo == repo_id)
        calls.append(f"{repo_id}/{filename}")
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / comp.local_root / filename, dest)
        return str(dest)

    return fetch


def test_download_into_musetalk_layout_and_skip_present(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_tiny_hashes(monkeypatch, tiny)
    calls: list[str] = []
    dest = tmp_path / "models"
    got = download.download(dest, fetch=_local_fetch(tiny, calls))
    n_files = sum(len(c.files) for c in COMPONENTS)
    assert len(got) == n_files == len(calls)
    assert "TMElyralab/MuseTalk/musetalkV15/unet.pth" in calls
    assert (dest / "musetalkV15" / "unet.pth").is_file() and (
        dest / "whisper/config.json"
    ).is_file()
    calls.clear()
    download.download(dest, fetch=_local_fetch(tiny, calls))
    assert calls == []  # everything present: nothing fetched again


def test_download_refuses_a_file_that_is_not_the_release(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[str] = []  # the real manifest: the tiny unet.pth is not the published file
    with pytest.raises(download.DownloadError, match="not the published one") as err:
        download.download(tmp_path / "models", fetch=_local_fetch(tiny, calls))
    assert "TMElyralab/MuseTalk/musetalkV15/unet.pth" in str(err.value)


def test_download_offline_reports_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def never(**_kw):
        raise AssertionError("fetched while offline")

    with pytest.raises(download.DownloadError, match="HF_HUB_OFFLINE"):
        download.download(tmp_path, fetch=never)


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def broken(**_kw):
        raise OSError("network unreachable")

    with pytest.raises(download.DownloadError, match="could not download TMElyralab/MuseTalk"):
        download.download(tmp_path, fetch=broken)


def test_models_verify_and_list_cli(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    # the tiny files are not the published release: they load, but verify says so and fails
    result = runner.invoke(app, ["models", "verify", "--models-dir", str(tiny)])
    assert result.exit_code == 1 and "MISMATCH" in result.output, result.output
    assert "unet: loads" in result.output and "differ from the published release" in result.output
    publish_tiny_hashes(monkeypatch, tiny)
    result = runner.invoke(app, ["models", "verify", "--models-dir", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "usable" in result.output and "MISMATCH" not in result.output
    assert "matches" in result.output
    listed = runner.invoke(app, ["models", "list", "--models-dir", str(tiny)])
    assert listed.exit_code == 0 and "models dir:" in listed.output
    bad = runner.invoke(app, ["models", "verify", "--models-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "livecam models download" in bad.output


def test_doctor_checks_the_weights_hashes(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECAM_MODELS_DIR", str(tiny))
    out = CliRunner().invoke(app, ["doctor"]).output
    assert "differ from the release" in out and "musetalkV15/unet.pth" in out
    publish_tiny_hashes(monkeypatch, tiny)
    out = CliRunner().invoke(app, ["doctor"]).output
    assert "sha256 of the release" in out and "differ" not in out


class _Mirror(http.server.BaseHTTPRequestHandler):
    """A Hugging Face mirror serving the tiny files: /REPO/resolve/REVISION/FILE."""

    root: Path
    requests: list[str]

    def _serve(self, body: bool) -> None:
        head, _, rest = self.path.partition("/resolve/")
        comp = next((c for c in COMPONENTS if rest and f"/{c.repo}" == head), None)
        path = None
        if comp is not None:
            filename = unquote(rest.split("?")[0].partition("/")[2])
            path = self.root / comp.local_root / filename
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._serve(False)

    def do_GET(self) -> None:
        self._serve(True)

    def log_message(self, *args) -> None:
        pass


def test_models_download_cli_from_a_mirror(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real huggingface_hub download path, against a local mirror (--endpoint)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    publish_tiny_hashes(monkeypatch, tiny)
    handler = type("Mirror", (_Mirror,), {"root": tiny, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, dest = f"http://127.0.0.1:{server.server_port}", tmp_path / "models"
    runner = CliRunner()
    try:
        args = ["models", "download", "--models-dir", str(dest), "--endpoint", url]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        gets = [r for r in handler.requests if r.startswith("GET")]
        assert len(gets) == sum(len(c.files) for c in COMPONENTS)
        for comp in COMPONENTS:
            for f in comp.files:
                got, want = comp.local_path(dest, f), comp.local_path(tiny, f)
                assert got.read_bytes() == want.read_bytes(), got
        again = runner.invoke(app, args)
        assert again.exit_code == 0 and "present" in again.output
        assert len([r for r in handler.requests if r.startswith("GET")]) == len(gets)
        verified = runner.invoke(app, ["models", "verify", "--models-dir", str(dest)])
        assert verified.exit_code == 0, verified.output
    finally:
        server.shutdown()
        server.server_close()


def test_a_librarys_error_is_cut_to_its_first_line() -> None:
    """Refusals quote a library's message (which can span a page) as one line of at most 200
    characters, or the error's kind when it has no message."""
    assert weights._first_line(ValueError("bad header\n  at byte 8\n")) == "bad header"
    assert weights._first_line(ValueError("x" * 300)) == "x" * 200
    assert weights._first_line(KeyError()) == "KeyError"
    assert weights._first_line(ValueError("  \n")) == "ValueError"

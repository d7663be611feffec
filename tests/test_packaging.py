"""The light default install: the lite path imports no neural-engine package, a missing
`musetalk` extra is one clear line, and the bundled avatars start without warnings.
(.ci/wheel-check builds the wheel and renders from it in a fresh venv.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from livecam.avatar import store
from livecam.engines import musetalk
from livecam.session import EngineError, build_engine
from tests.conftest import SPEECH

HEAVY = ("torch", "transformers", "diffusers", "safetensors", "huggingface_hub")


def test_a_lite_render_imports_no_neural_engine_package(tmp_path: Path) -> None:
    script = f"""
import sys
from typer.testing import CliRunner
from livecam.cli import app
args = ["render", "--audio", {str(SPEECH)!r}, "--out", {str(tmp_path / "c.mp4")!r},
        "--size", "160x120"]
result = CliRunner().invoke(app, args)
assert result.exit_code == 0, result.output
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "c.mp4").stat().st_size > 0


def test_musetalk_without_its_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = musetalk.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "diffusers" else real(name, *args)

    monkeypatch.setattr(musetalk.importlib.util, "find_spec", find_spec)
    with pytest.raises(EngineError, match=r"needs diffusers: pip install 'livecam\[musetalk\]'"):
        build_engine("musetalk", store.load_avatar("astronaut"), 25)


@pytest.mark.parametrize("name", ["astronaut", "portrait"])
def test_a_bundled_avatar_starts_quietly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        avatar = store.load_avatar(name)  # first use: prepared from the bundled photo
    assert avatar.warnings == [] and not caplog.records


def test_the_package_carries_its_avatars_and_sample() -> None:
    root = Path(store.__file__).resolve().parents[1]
    assert (root / "avatars" / "astronaut" / "avatar.toml").is_file()
    assert store.bundled_root() == root / "avatars"
    assert (root / "samples" / "jfk.wav").is_file()

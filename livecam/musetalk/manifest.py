"""What the musetalk engine needs, where it comes from, and where it lives on disk.

The layout is the one MuseTalk's own download script produces (models/musetalkV15/,
models/sd-vae/, models/whisper/), plus taesd/ for the optional tiny decoder, so an existing
MuseTalk install can be used as the models directory as is.

Sizes are approximate (from the Hugging Face file listings); sha256 is recorded only where it
was verified, and None means "unknown": `livecam models verify` then says the file could not be
matched against the official release instead of pretending it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "LIVECAM_MODELS_DIR"


@dataclass(frozen=True)
class ModelFile:
    repo_path: str  # file name inside the Hugging Face repo
    approx_bytes: int | None  # from the hub listing; None when unknown
    sha256: str | None = None  # official release hash, None: unknown (not verified here)
    pickle: bool = False  # a torch pickle: loaded with weights_only=True, converted once


@dataclass(frozen=True)
class Component:
    name: str  # "unet" | "vae" | "whisper" | "taesd"
    repo: str  # Hugging Face repo id
    local_root: str  # folder under the models dir that mirrors the repo ("" = the dir itself)
    files: tuple[ModelFile, ...]
    license: str
    description: str
    optional: bool = False
    revision: str | None = None  # None: the repo's default branch

    def local_path(self, models_dir: Path, f: ModelFile) -> Path:
        return models_dir / self.local_root / f.repo_path

    @property
    def folder(self) -> str:
        """The component's folder relative to the models dir."""
        first = Path(self.local_root) / self.files[0].repo_path
        return str(first.parent)


MB = 1_000_000
COMPONENTS: tuple[Component, ...] = (
    Component(
        name="unet",
        repo="TMElyralab/MuseTalk",
        local_root="",
        files=(
            ModelFile("musetalkV15/unet.pth", 3_400 * MB, pickle=True),
            ModelFile("musetalkV15/musetalk.json", 1_000),
        ),
        license="MIT (MuseTalk code and weights: 'available for any purpose, even commercially')",
        description="MuseTalk v1.5 UNet (single-step latent inpainting)",
    ),
    Component(
        name="vae",
        repo="stabilityai/sd-vae-ft-mse",
        local_root="sd-vae",
        files=(
            ModelFile("config.json", 1_000),
            ModelFile("diffusion_pytorch_model.bin", 335 * MB, pickle=True),
        ),
        license="MIT",
        description="Stable Diffusion VAE, ft-MSE decoder (encoder + full decoder)",
    ),
    Component(
        name="whisper",
        repo="openai/whisper-tiny",
        local_root="whisper",
        files=(
            ModelFile("config.json", 2_000),
            ModelFile("pytorch_model.bin", 151 * MB, pickle=True),
            ModelFile("preprocessor_config.json", 200_000),
        ),
        license="Apache-2.0",
        description="whisper-tiny (only the audio encoder is used)",
    ),
    Component(
        name="taesd",
        repo="madebyollin/taesd",
        local_root="taesd",
        files=(
            ModelFile("config.json", 1_000),
            ModelFile("diffusion_pytorch_model.safetensors", 10 * MB),
        ),
        license="MIT",
        description="TAESD tiny decoder (the fast 'tiny' quality tier)",
        optional=True,
    ),
)


def component(name: str) -> Component:
    for comp in COMPONENTS:
        if comp.name == name:
            return comp
    raise KeyError(name)


def default_models_dir() -> Path:
    """$LIVECAM_MODELS_DIR, else $XDG_DATA_HOME/livecam/models, else ~/.local/share/..."""
    if env := os.environ.get(MODELS_DIR_ENV):
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "livecam" / "models"


def missing_files(models_dir: Path, *, include_optional: bool = False) -> list[Path]:
    """Required (and optionally the optional) files that are not present."""
    out = []
    for comp in COMPONENTS:
        if comp.optional and not include_optional:
            continue
        out += [p for f in comp.files if not (p := comp.local_path(models_dir, f)).is_file()]
    return out


def has_component(models_dir: Path, name: str) -> bool:
    comp = component(name)
    return all(comp.local_path(models_dir, f).is_file() for f in comp.files)

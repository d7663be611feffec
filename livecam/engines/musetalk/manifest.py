"""What the musetalk engine needs, where it comes from, and where it lives on disk.

The layout is the one MuseTalk's own download script produces (models/musetalkV15/,
models/sd-vae/, models/whisper/), plus taesd/ for the optional tiny decoder, so an existing
MuseTalk install can be used as the models directory as is.

Downloads are pinned to a repo revision where one is recorded, so the files cannot change under
a user. `release_sha256` holds the hashes of the released files (Git LFS sha256 on the Hugging
Face file pages, cross-checked against independent MuseTalk installers that pin the same
revisions; taesd is not pinned and lists each released version). An empty tuple means
"unknown": `livecam models verify` then says the file could not be matched instead of
pretending it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from livecam.paths import data_home

MODELS_DIR_ENV = "LIVECAM_MODELS_DIR"


@dataclass(frozen=True)
class ModelFile:
    repo_path: str  # file name inside the Hugging Face repo
    approx_bytes: int | None  # exact where recorded, else rounded from the hub listing
    release_sha256: tuple[str, ...] = ()  # published hashes; () = unknown
    pickle: bool = False  # a torch pickle: loaded with weights_only=True, converted once
    alt_path: str | None = None  # also accepted in its place (never a published release)


@dataclass(frozen=True)
class Component:
    name: str  # "unet" | "vae" | "whisper" | "taesd"
    repo: str  # Hugging Face repo id
    local_root: str  # folder under the models dir that mirrors the repo ("" = the dir itself)
    files: tuple[ModelFile, ...]
    license: str
    description: str
    optional: bool = False
    revision: str | None = None  # a pinned commit; None: the repo's default branch

    def local_path(self, models_dir: Path, f: ModelFile) -> Path:
        return models_dir / self.local_root / f.repo_path

    def present_path(self, models_dir: Path, f: ModelFile) -> Path | None:
        """The file, else its accepted alternative, whichever exists first; None if neither."""
        for name in (f.repo_path, f.alt_path):
            if name and (path := models_dir / self.local_root / name).is_file():
                return path
        return None

    @property
    def folder(self) -> str:
        """The component's folder relative to the models dir."""
        first = Path(self.local_root) / self.files[0].repo_path
        return str(first.parent)


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="unet",
        repo="TMElyralab/MuseTalk",
        revision="2bcb936e2fddb4d86db4c62fd45b387d0c061571",
        local_root="",
        files=(
            ModelFile(
                "musetalkV15/unet.pth",
                3_400_074_924,
                pickle=True,
                release_sha256=(
                    "7ebf6c98c181e20838e4c0054e96e944ac60d5d692cc01db42839fe11b787007",
                ),
            ),
            ModelFile(
                "musetalkV15/musetalk.json",
                748,
                release_sha256=(
                    "5b6923aee04d71692e0e9846c471e0a4ea07a4f686d39545e472bd4ba17e1b47",
                ),
            ),
        ),
        license="MIT (MuseTalk code and weights: 'available for any purpose, even commercially')",
        description="MuseTalk v1.5 UNet (single-step latent inpainting)",
    ),
    Component(
        name="vae",
        repo="stabilityai/sd-vae-ft-mse",
        revision="31f26fdeee1355a5c34592e401dd41e45d25a493",
        local_root="sd-vae",
        files=(
            ModelFile(
                "config.json",
                547,
                release_sha256=(
                    "92d3dfb746fca211a2c9e019e285f8597412211728dce3c5bcf4eda0f2d62e7e",
                ),
            ),
            # the Oct 2022 upload: diffusers 0.4 attention names (query/key/value/proj_attn)
            ModelFile(
                "diffusion_pytorch_model.bin",
                334_707_217,
                pickle=True,
                release_sha256=(
                    "1b4889b6b1d4ce7ae320a02dedaeff1780ad77d415ea0d744b476155c6377ddc",
                ),
            ),
        ),
        license="MIT",
        description="Stable Diffusion VAE, ft-MSE decoder (encoder + full decoder)",
    ),
    Component(
        name="whisper",
        repo="openai/whisper-tiny",
        revision="169d4a4341b33bc18d8881c4b69c2e104e1cc0af",
        local_root="whisper",
        files=(
            ModelFile(
                "config.json",
                2_000,
                release_sha256=(
                    "ffdccec4f3211f4c63310f2b7098f309fe70f3952cedc5e4d11e43f5b2379b98",
                ),
            ),
            ModelFile(
                "pytorch_model.bin",
                151_095_027,
                pickle=True,
                release_sha256=(
                    "9607f98a2b22d9e229ae43c52ecea79dcede9e0c5cfae67e8da6eda86d8aac1d",
                ),
                alt_path="model.safetensors",  # `livecam models import-whisper-ct2` writes it
            ),
            ModelFile(
                "preprocessor_config.json",
                185_000,
                release_sha256=(
                    "9b5cd03a36fbb8a627c64d98a5b5b126ead95a77720723944487311f0110b666",
                ),
            ),
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
            ModelFile(  # TAESD 1.2 and 1.3
                "diffusion_pytorch_model.safetensors",
                9_793_292,
                release_sha256=(
                    "d7956d561b1efbd861ad9b03fd8f01510f9e87eddc07bdfd20837009433f6ee5",
                    "db169d69145ec4ff064e49d99c95fa05d3eb04ee453de35824a6d0f325513549",
                ),
            ),
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
    return data_home() / "livecam" / "models"


def missing_files(models_dir: Path, *, include_optional: bool = False) -> list[Path]:
    """Required (and optionally the optional) files that are not present."""
    out = []
    for comp in COMPONENTS:
        if comp.optional and not include_optional:
            continue
        out += [comp.local_path(models_dir, f) for f in comp.files
                if comp.present_path(models_dir, f) is None]  # fmt: skip
    return out


def missing_weights(models_dir: Path) -> str | None:
    """What is missing in `models_dir` and how to get it; None where nothing is."""
    missing = missing_files(models_dir)
    if not missing:
        return None
    names = ", ".join(str(p.relative_to(models_dir)) for p in missing)
    return (
        f"MuseTalk weights missing in {models_dir} ({names}): run `livecam models download` "
        "(or point --models-dir / LIVECAM_MODELS_DIR at an existing MuseTalk models folder)"
    )


def has_component(models_dir: Path, name: str) -> bool:
    comp = component(name)
    return all(comp.present_path(models_dir, f) is not None for f in comp.files)

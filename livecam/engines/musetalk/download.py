"""`livecam models download|verify`: fetch the manifest's files and check them.

Downloads go through huggingface_hub (resumable: an interrupted file continues where it
stopped; progress bars on the terminal) into the MuseTalk layout. With HF_HUB_OFFLINE set
nothing is fetched: present files are checked and missing ones reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livecam.engines.musetalk import weights
from livecam.engines.musetalk.manifest import COMPONENTS, Component, ModelFile, has_component

Fetch = Callable[..., str]


class DownloadError(Exception):
    """Files could not be fetched; the message says which and what to do."""


@dataclass(frozen=True)
class FileStatus:
    component: str
    path: Path
    present: bool
    size: int | None
    hash_status: str  # "official" | "mismatch" | "unknown" (no official hash recorded) | "-"


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def hash_status(path: Path, f: ModelFile) -> str:
    if path.name != Path(f.repo_path).name:
        return "mismatch"  # the accepted alternative (an imported file) is never the release
    if not f.release_sha256:
        return "unknown"
    return "official" if weights.cached_sha256(path) in f.release_sha256 else "mismatch"


def file_status(models_dir: Path, comp: Component, f: ModelFile, hashes: bool) -> FileStatus:
    path = comp.present_path(models_dir, f)
    if path is None:
        return FileStatus(comp.name, comp.local_path(models_dir, f), False, None, "-")
    status = hash_status(path, f) if hashes else "-"
    return FileStatus(comp.name, path, True, path.stat().st_size, status)


def download(
    models_dir: Path,
    *,
    include_optional: bool = True,
    fetch: Fetch | None = None,
    report: Callable[[str], None] = lambda _msg: None,
    endpoint: str | None = None,
) -> list[Path]:
    """Fetch every missing (or hash-mismatched) file; returns the files now present.
    `endpoint`: a Hugging Face mirror's base URL (default: $HF_ENDPOINT, else the hub)."""
    if fetch is None:
        from huggingface_hub import hf_hub_download as fetch
    offline = hub_offline()
    done, missing = [], []
    for comp in COMPONENTS:
        if comp.optional and not include_optional:
            continue
        for f in comp.files:
            path = comp.local_path(models_dir, f)
            if path.is_file() and hash_status(path, f) != "mismatch":
                report(f"present  {path}")
                done.append(path)
                continue
            if offline:
                missing.append(path)
                continue
            report(f"fetching {comp.repo}/{f.repo_path}")
            got = Path(_fetch(fetch, comp, f, models_dir, endpoint))
            if got.resolve() != path.resolve():
                raise DownloadError(f"{comp.repo}/{f.repo_path} landed in {got}, not {path}")
            if hash_status(path, f) == "mismatch":
                raise DownloadError(
                    f"{path} was downloaded but its sha256 is not the published one for "
                    f"{comp.repo}/{f.repo_path}: the download is damaged. "
                    "Delete the file and run `livecam models download` again"
                )
            done.append(path)
    if missing:
        raise DownloadError(
            "HF_HUB_OFFLINE is set and these files are missing: "
            + ", ".join(str(p) for p in missing)
            + f". Copy them into {models_dir} or unset HF_HUB_OFFLINE"
        )
    return done


def _fetch(
    fetch: Fetch, comp: Component, f: ModelFile, models_dir: Path, endpoint: str | None
) -> str:
    local_dir = models_dir / comp.local_root if comp.local_root else models_dir
    local_dir.mkdir(parents=True, exist_ok=True)
    mirror = {"endpoint": endpoint} if endpoint else {}
    try:
        return fetch(repo_id=comp.repo, filename=f.repo_path, revision=comp.revision,
                     local_dir=local_dir, **mirror)  # fmt: skip
    except Exception as exc:  # network, auth, missing file: one clear line for the user
        raise DownloadError(
            f"could not download {comp.repo}/{f.repo_path}: {type(exc).__name__}: {exc}"
        ) from None


def _check_shapes(models_dir: Path, name: str) -> str:
    """Load one component through the real loaders and check it fits the others."""
    if name == "unet":
        unet: Any = weights.load_unet(models_dir)
        c = unet.config
        if (c.in_channels, c.out_channels, c.cross_attention_dim) != (8, 4, 384):
            return f"unexpected UNet shape (in {c.in_channels}, out {c.out_channels})"
        return f"loads; {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters"
    if name in ("vae", "taesd"):
        vae: Any = weights.load_vae(models_dir) if name == "vae" else weights.load_taesd(models_dir)
        if vae.config.latent_channels != 4:
            return f"latent_channels {vae.config.latent_channels}, the UNet needs 4"
        return "loads; latent channels 4"
    enc: Any = weights.load_whisper_encoder(models_dir)
    extractor = weights.load_feature_extractor(models_dir)
    if enc.config.d_model != 384 or enc.config.num_mel_bins != extractor.feature_size:
        return f"d_model {enc.config.d_model} / mel bins {enc.config.num_mel_bins}: need 384 / 80"
    return f"loads; d_model 384, {enc.config.encoder_layers} encoder layers"


def file_statuses(models_dir: Path) -> list[FileStatus]:
    """Every manifest file: present or not, and its sha256 against the release."""
    return [file_status(models_dir, c, f, hashes=True) for c in COMPONENTS for f in c.files]


def release_mismatches(models_dir: Path) -> list[Path]:
    """Present weight files whose sha256 is not a published release hash."""
    return [r.path for r in file_statuses(models_dir) if r.hash_status == "mismatch"]


def verify(models_dir: Path, *, load: bool = True) -> tuple[list[FileStatus], dict[str, str], bool]:
    """(file rows, per-component load result, all required components load and fit)."""
    rows = file_statuses(models_dir)
    results: dict[str, str] = {}
    ok = True
    for comp in COMPONENTS:
        if not has_component(models_dir, comp.name):
            results[comp.name] = "missing (optional)" if comp.optional else "missing"
            ok = ok and comp.optional
            continue
        if not load:
            results[comp.name] = "present"
            continue
        try:
            msg = _check_shapes(models_dir, comp.name)
        except weights.WeightsError as exc:
            msg = f"FAILED: {exc}"
        results[comp.name] = msg
        ok = ok and msg.startswith("loads")
    return rows, results, ok

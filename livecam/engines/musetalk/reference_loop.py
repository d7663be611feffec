"""MuseTalk's own real-time loop, run from a checkout of its repository, on our inputs.

The reference is TMElyralab/MuseTalk's scripts/realtime_inference.py with
`--skip_save_images`: its UNet and VAE wrappers (musetalk/models), its batcher
(musetalk/utils/utils.datagen) and its PIL blending (musetalk/utils/blending) are imported
from the checkout, unchanged; only the loop that drives them is restated here, because the
script itself imports face detection and pose models that a benchmark does not need. The
loop, as the script runs it: for each batch of `batch_size` frames (default 20), add the
positional encoding, UNet at timestep 0, decode with the VAE (which copies the faces to the
host), and queue the faces; a second thread resizes each face into its box and blends it into
a copy of the avatar frame. Its figure is frames / time from the first batch to the last blend.

The weights are the same random full-size models livecam measures, written in the release
formats (unet.pth + musetalk.json, a diffusers VAE folder); the inputs are the same avatar
frame, face box, blend mask, latents and audio features.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from livecam.engines.musetalk.architecture import REFERENCE_UNET, REFERENCE_VAE, TINY_UNET, TINY_VAE

DEFAULT_BATCH = 20  # realtime_inference.py --batch_size
REQUIRED = ("musetalk/models/unet.py", "musetalk/models/vae.py", "musetalk/utils/utils.py",
            "musetalk/utils/blending.py")  # fmt: skip


@dataclass
class ReferenceInputs:
    frame: np.ndarray  # (H, W, 3) uint8 BGR avatar frame
    box: tuple[int, int, int, int]  # face box x1, y1, x2, y2
    mask: np.ndarray  # (h, w, 1) float32 feathered lower-face mask inside the box
    latents: torch.Tensor  # (1, 8, 32, 32) on the device
    features: torch.Tensor  # (n, 50, 384) float32 per-frame audio features (CPU)


def check_checkout(checkout: Path) -> None:
    missing = [name for name in REQUIRED if not (checkout / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{checkout} is not a MuseTalk checkout (missing {', '.join(missing)}): "
            "git clone https://github.com/TMElyralab/MuseTalk and pass its folder"
        )


def _stand_in_for_torchvision() -> None:
    """The reference's VAE wrapper imports torchvision for one `transforms.Normalize`, used
    when it encodes images (never in the loop). Where torchvision is absent (it is not a
    livecam dependency), an equivalent Normalize lets the unchanged wrapper import."""
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        package, transforms = types.ModuleType("torchvision"), types.ModuleType("transforms")
        transforms.Normalize = _Normalize  # type: ignore[attr-defined]
        package.transforms = transforms  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})


class _Normalize:
    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean.to(image)) / self.std.to(image)


def write_release_formats(models: Any, folder: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """The models' weights as the reference loads them: (musetalk.json, unet.pth, vae dir)."""
    from diffusers import AutoencoderKL

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "musetalk.json"
    config.write_text(json.dumps(TINY_UNET if tiny else REFERENCE_UNET))
    unet_file = folder / "unet.pth"
    torch.save({k: v.float().cpu() for k, v in models.unet.state_dict().items()}, unet_file)
    vae = AutoencoderKL.from_config(TINY_VAE if tiny else REFERENCE_VAE)
    vae.load_state_dict({k: v.float().cpu() for k, v in models.vae.state_dict().items()})
    vae.save_pretrained(folder / "sd-vae")
    return config, unet_file, folder / "sd-vae"


def _crop_and_mask(inputs: ReferenceInputs, blending: Any) -> tuple[list[int], np.ndarray]:
    """MuseTalk's expanded crop box around the face box, and our mask placed in it (8-bit),
    the form get_image_prepare_material returns (its face-parsing mask is replaced by ours)."""
    crop_box, _ = blending.get_crop_box(inputs.box, 1.5)
    x1, y1, x2, y2 = inputs.box
    xs, ys, xe, ye = crop_box
    mask = np.zeros((ye - ys, xe - xs), np.uint8)
    mask[y1 - ys : y2 - ys, x1 - xs : x2 - xs] = (inputs.mask[..., 0] * 255).round()
    return list(crop_box), mask


def run_reference(
    checkout: Path, models: Any, inputs: ReferenceInputs, workdir: Path, tiny: bool,
    batch: int = DEFAULT_BATCH, runs: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Frames per second of the reference loop, per run (the first includes cuDNN's tuning)."""
    check_checkout(checkout)
    _stand_in_for_torchvision()
    sys.path.insert(0, str(checkout))
    try:
        from musetalk.models.unet import PositionalEncoding, UNet
        from musetalk.models.vae import VAE
        from musetalk.utils import blending
        from musetalk.utils.utils import datagen
    finally:
        sys.path.remove(str(checkout))
    config, unet_file, vae_dir = write_release_formats(models, workdir, tiny)
    device = models.device
    unet = UNet(unet_config=str(config), model_path=str(unet_file), use_float16=True,
                device=device)  # fmt: skip
    vae = VAE(model_path=str(vae_dir), use_float16=True)
    vae.vae = vae.vae.half().to(device)
    pe = PositionalEncoding(d_model=384).half().to(device)
    timesteps = torch.tensor([0], device=device)
    crop_box, mask = _crop_and_mask(inputs, blending)
    chunks = list(inputs.features.half())
    fps = []
    for _ in range(runs):
        seconds = _reference_loop(
            unet, vae, pe, timesteps, datagen, blending, inputs, chunks, crop_box, mask, batch
        )
        fps.append(round(len(chunks) / seconds, 2))
    return {"batch": batch, "frames": len(chunks), "fps_per_run": fps, "fps": fps[-1],
            "dtype": "float16", "source": str(checkout)}  # fmt: skip


@torch.no_grad()
def _reference_loop(
    unet: Any, vae: Any, pe: Any, timesteps: torch.Tensor, datagen: Any, blending: Any,
    inputs: ReferenceInputs, chunks: list[torch.Tensor], crop_box: list[int], mask: np.ndarray,
    batch: int,
) -> float:  # fmt: skip
    device = timesteps.device
    faces: queue.Queue = queue.Queue()
    x1, y1, x2, y2 = inputs.box

    def blend_all() -> None:
        for _ in range(len(chunks)):
            face = cv2.resize(faces.get().astype(np.uint8), (x2 - x1, y2 - y1))
            blending.get_image_blending(inputs.frame.copy(), face, inputs.box, mask, crop_box)

    blender = threading.Thread(target=blend_all, daemon=True)
    start = time.perf_counter()
    blender.start()
    for whisper_batch, latent_batch in datagen(chunks, [inputs.latents], batch, device=device):
        audio_features = pe(whisper_batch.to(device))
        latent_batch = latent_batch.to(device=device, dtype=unet.model.dtype)
        pred = unet.model(latent_batch, timesteps, encoder_hidden_states=audio_features).sample
        for face in vae.decode_latents(pred.to(device=device, dtype=vae.vae.dtype)):
            faces.put(face)
    blender.join()
    return time.perf_counter() - start

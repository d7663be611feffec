"""Blend generated faces into the avatar's face box on the torch device.

The 256x256 faces never come back to the host: the box's pixels go up (h x w x 3 bytes a
frame), the face is resized (bilinear, as cv2.INTER_LINEAR) and blended with the feathered
lower-face mask there, and only the blended box comes back. On CUDA the host side uses
page-locked buffers, so both copies are asynchronous DMA instead of staged pageable copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def host_buffer(shape: tuple[int, ...], device: torch.device, pinned: bool) -> torch.Tensor:
    """A uint8 host tensor; page-locked when copies go to or from a CUDA device."""
    pin = pinned and device.type == "cuda"
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)


def faces_to_host(faces: torch.Tensor, staging: torch.Tensor | None = None) -> np.ndarray:
    """(n, 256, 256, 3) uint8 device faces -> host array, through `staging` (a page-locked
    buffer of at least n faces, reused call after call) when given."""
    if staging is None or faces.device.type != "cuda":
        return faces.cpu().numpy()
    out = staging[: len(faces)]
    out.copy_(faces, non_blocking=True)
    torch.cuda.current_stream(faces.device).synchronize()
    return out.numpy().copy()  # the caller keeps it; the staging buffer is reused


class DeviceBlender:
    """Blends batches of faces into face-box crops of the avatar frames, on one device."""

    def __init__(self, mask: np.ndarray, device: torch.device, pinned: bool) -> None:
        self.h, self.w = mask.shape[:2]
        self.device, self.pinned = device, pinned
        self._mask = torch.from_numpy(np.ascontiguousarray(mask)).to(device)  # (h, w, 1)
        self._up: torch.Tensor | None = None  # host staging, grown to the largest batch
        self._down: torch.Tensor | None = None

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._up is None or len(self._up) < n:
            shape = (n, self.h, self.w, 3)
            self._up = host_buffer(shape, self.device, self.pinned)
            self._down = host_buffer(shape, self.device, self.pinned)
        assert self._down is not None
        return self._up[:n], self._down[:n]

    @torch.inference_mode()
    def blend(
        self, faces: torch.Tensor, boxes: Sequence[np.ndarray], weights: Sequence[float]
    ) -> None:
        """faces (n, 256, 256, 3) uint8 on the device; boxes: n (h, w, 3) uint8 views of the
        frames' face box, overwritten with the blend; weights: per-frame mask strength 0..1."""
        n = len(boxes)
        up, down = self._buffers(n)
        for i, box in enumerate(boxes):
            up[i].numpy()[...] = box
        roi = up.to(self.device, non_blocking=True).float()  # (n, h, w, 3)
        face = faces[:n].permute(0, 3, 1, 2).float()  # (n, 3, 256, 256)
        face = F.interpolate(face, size=(self.h, self.w), mode="bilinear", align_corners=False)
        w = torch.tensor(list(weights), dtype=torch.float32).to(self.device, non_blocking=True)
        mask = self._mask * w[:, None, None, None].clamp(0.0, 1.0)  # (n, h, w, 1)
        out = roi + (face.permute(0, 2, 3, 1) - roi) * mask
        down.copy_((out + 0.5).to(torch.uint8), non_blocking=True)  # rounds: values >= 0
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        for i, box in enumerate(boxes):
            box[...] = down[i].numpy()

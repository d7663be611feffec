"""Weight files that declare gigabytes in a few bytes of disk (sparse files): checked
before their data is read, in a child process under an address-space limit, and nothing
is left in the weights cache."""

from __future__ import annotations

import shutil
import struct
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from livecam.engines.musetalk import weights
from tests.helpers import MEMORY_LIMIT, run_limited
from tests.musetalk_tiny import tiny_models_dir

SHAPE_MARK = 12345  # the numel of the template tensor, rewritten in its pickle
ALIGN = 64  # torch aligns each record's data to 64 bytes (for memory-mapping)


def _crc_of_zeros(size: int) -> int:
    block = bytes(1 << 24)
    crc = 0
    for start in range(0, size, len(block)):
        crc = zlib.crc32(block[: min(len(block), size - start)], crc)
    return crc


def write_sparse_checkpoint(path: Path, name: str, numel: int, *, cut: bool = False) -> None:
    """A torch zip checkpoint {name: float32 zeros of `numel`} whose data is a hole in a
    sparse file (a few KB on disk); with `cut`, the data is declared but not there."""
    template = path.with_suffix(".template")
    torch.save({name: torch.zeros(SHAPE_MARK)}, template)
    with zipfile.ZipFile(template) as src:
        records = [(i.filename, src.read(i)) for i in src.infolist()]
    template.unlink()
    big = b"J" + struct.pack("<i", numel)  # BININT replaces the template's BININT2 12345
    central = b""
    with path.open("wb") as fh:
        for filename, data in records:
            hole = filename.endswith("/data/0")
            if filename.endswith("/data.pkl"):
                data = data.replace(b"M" + struct.pack("<H", SHAPE_MARK), big)
            size = numel * 4 if hole else len(data)
            crc = _crc_of_zeros(size) if hole else zlib.crc32(data)
            offset, raw = fh.tell(), filename.encode()
            pad = -(offset + 30 + len(raw) + 4) % ALIGN
            extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            fh.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size,
                                 len(raw), len(extra)) + raw + extra)  # fmt: skip
            if not hole:
                fh.write(data)
            elif not cut:
                fh.seek(size, 1)
            central += struct.pack("<4s6H3I5HII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, size,
                                   size, len(raw), 0, 0, 0, 0, 0, offset) + raw  # fmt: skip
        start = fh.tell()
        fh.write(central)
        fh.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(records), len(records),
                             len(central), start, 0))  # fmt: skip


def write_deflated_checkpoint(path: Path, name: str, numel: int) -> None:
    """A torch zip checkpoint {name: float32 zeros of `numel`} with only its data deflated
    (torch never compresses): gigabytes in a few MB, streamed so the test allocates nothing."""
    template = path.with_suffix(".template")
    torch.save({name: torch.zeros(SHAPE_MARK)}, template)
    with zipfile.ZipFile(template) as src:
        records = [(i.filename, src.read(i)) for i in src.infolist()]
    template.unlink()
    block = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for filename, data in records:
            if filename.endswith("/data.pkl"):
                data = data.replace(b"M" + struct.pack("<H", SHAPE_MARK),
                                    b"J" + struct.pack("<i", numel))  # fmt: skip
            if not filename.endswith("/data/0"):
                dst.writestr(filename, data, compress_type=zipfile.ZIP_STORED)
                continue
            with dst.open(filename, "w", force_zip64=True) as fh:
                for start in range(0, numel * 4, len(block)):
                    fh.write(block[: min(len(block), numel * 4 - start)])


def _cache_files() -> set[str]:
    folder = weights.weights_cache_dir()
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return names - {"hashes.json"}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_models_dir(), tmp_path / "models"))


def test_the_sparse_checkpoint_is_a_real_one(tmp_path):
    """The builder's output loads as what it declares (so the tests below test torch files)."""
    path = tmp_path / "small.pth"
    write_sparse_checkpoint(path, "w", 1000)
    state = torch.load(path, weights_only=True)
    assert state["w"].shape == (1000,) and not state["w"].any()


DECLARED = 1_500_000_000  # bytes of float32 the bomb declares
LOAD_UNET = textwrap.dedent("""
    import sys
    from pathlib import Path
    from livecam.engines.musetalk import weights
    try:
        weights.load_unet(Path(sys.argv[1]))
        print("loaded")
    except weights.WeightsError as exc:
        print(exc)
    # this process's own peak: ru_maxrss would include the forking parent's (Linux keeps it
    # across execve), i.e. pytest's, gigabytes late in a full run
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    print(int(status.split()[0]) * 1024)
""")


def test_a_huge_checkpoint_of_the_wrong_shape_is_refused_unread(models):
    """1.5 GB of declared weights that do not fit: refused from the file's metadata alone
    (peak memory far below the data's size), nothing converted into the cache."""
    pth = models / "musetalkV15" / "unet.pth"
    write_sparse_checkpoint(pth, "conv_in.weight", DECLARED // 4)
    assert pth.stat().st_blocks * 512 < 1 << 20  # a hole on disk
    before = _cache_files()
    # the mapping of the file needs address space, not memory
    result = run_limited([sys.executable, "-c", LOAD_UNET, str(models)],
                         limit=MEMORY_LIMIT + DECLARED)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    message, peak = result.stdout.strip().splitlines()
    assert "weights do not fit the config" in message and "\n" not in message
    assert int(peak) < DECLARED * 2 // 3, f"peak memory {int(peak) / 1e9:.2f} GB: data was read"
    assert _cache_files() == before


def test_a_checkpoint_cut_short_is_refused_before_mapping(models):
    pth = models / "musetalkV15" / "unet.pth"
    write_sparse_checkpoint(pth, "conv_in.weight", DECLARED // 4, cut=True)
    assert pth.stat().st_size < 100_000
    before = _cache_files()
    with pytest.raises(weights.WeightsError, match="reaches past the end of the file"):
        weights.load_unet(models)
    assert _cache_files() == before


def test_float64_weights_are_refused(models):
    from diffusers import UNet2DConditionModel

    from tests.musetalk_tiny import TINY_UNET

    unet = UNet2DConditionModel.from_config(TINY_UNET).double()
    torch.save(unet.state_dict(), models / "musetalkV15" / "unet.pth")
    with pytest.raises(weights.WeightsError, match=r"torch\.float64; the release stores float32"):
        weights.load_unet(models)


def test_models_verify_refuses_a_deflated_bomb_under_a_memory_limit(models):
    """The issue's case: a few MB of deflated zeros as unet.pth took 2.5 GB in `models verify`
    and left a 1 GB safetensors copy in the cache."""
    pth = models / "musetalkV15" / "unet.pth"
    write_deflated_checkpoint(pth, "conv_in.weight", MEMORY_LIMIT * 5 // 4 // 4)
    assert pth.stat().st_size < 20_000_000
    result = run_limited([sys.executable, "-m", "livecam", "models", "verify",
                          "--models-dir", str(models)])  # fmt: skip
    output = " ".join(result.stdout.split())
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "data/0 is compressed, which torch never writes" in output, output
    # the other (tiny) models load and are converted; nothing of the bomb, no temporaries
    sha = weights.sha256_file(pth)
    assert not [n for n in _cache_files() if sha in n or n.startswith(".")]

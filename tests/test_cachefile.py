"""livecam.cachefile: whole-file replacement and checksummed .npz arrays, on real files."""

from __future__ import annotations

import numpy as np
import pytest

from livecam import cachefile
from livecam.hashing import sha256_array


def _arrays() -> dict[str, np.ndarray]:
    return {
        "image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
        "coords": np.array([[1.5, -2.0], [3.25, 4.0]], np.float32),
    }


def test_checksums_name_each_array_by_its_own_hash():
    arrays = _arrays()
    assert cachefile.checksums(arrays) == {k: sha256_array(v) for k, v in arrays.items()}
    assert cachefile.checksums({}) == {}


def test_saved_arrays_load_back_equal_with_the_returned_checksums(tmp_path):
    arrays = _arrays()
    sums = cachefile.save_arrays(tmp_path / "a.npz", arrays)
    assert sums == cachefile.checksums(arrays)
    loaded = cachefile.load_arrays(tmp_path / "a.npz", sums)
    assert set(loaded) == set(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary left


def test_a_save_replaces_the_old_file_whole(tmp_path):
    path = tmp_path / "a.npz"
    cachefile.save_arrays(path, {"x": np.zeros(4, np.int16)})
    sums = cachefile.save_arrays(path, {"y": np.ones(3, np.int16)})
    assert list(cachefile.load_arrays(path, sums)) == ["y"]


def test_the_temporary_is_a_hidden_sibling_of_the_target(tmp_path):
    # same folder: os.replace is an atomic rename only within one filesystem; hidden and named
    # after the target: a leftover from a killed writer is recognisable and never read as a cache
    path = tmp_path / "a.npz"
    seen: list[str] = []

    def write(fh) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        fh.write(b"payload")

    cachefile.replace_file(path, write)
    assert len(seen) == 1
    assert seen[0].startswith(".a.npz.") and seen[0].endswith(".tmp")
    assert path.read_bytes() == b"payload"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"old")

    def write(fh) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        cachefile.replace_file(path, write)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_a_damaged_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "a.npz"
    sums = cachefile.save_arrays(path, _arrays())
    path.write_bytes(path.read_bytes()[:100])  # truncated zip
    with pytest.raises(ValueError, match=r"^unreadable a\.npz: ") as err:
        cachefile.load_arrays(path, sums)
    assert err.value.__cause__ is not None  # the zip/zlib error is kept for debugging


def test_a_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ValueError, match=r"^unreadable gone\.npz: "):
        cachefile.load_arrays(tmp_path / "gone.npz", {})


def test_pickled_arrays_are_refused_not_unpickled(tmp_path):
    # an object array is stored as a pickle; loading it would run code from the cache folder
    path = tmp_path / "a.npz"
    np.savez(path, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"^unreadable a\.npz: .*allow_pickle"):
        cachefile.load_arrays(path, {"obj": "0" * 64})


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_an_array_set_other_than_the_manifests_is_refused(tmp_path, change):
    path = tmp_path / "a.npz"
    sums = cachefile.save_arrays(path, _arrays())
    if change == "extra":
        sums.pop("coords")
    else:
        sums["depth"] = sums["image"]
    with pytest.raises(ValueError, match=r"^array set differs from the manifest$"):
        cachefile.load_arrays(path, sums)


@pytest.mark.parametrize("key", ["image", "coords"])
def test_an_array_whose_bytes_changed_is_a_checksum_mismatch_naming_it(tmp_path, key):
    # rewritten as a valid zip (the zip CRC passes), so only the manifest's sha256 can tell
    path = tmp_path / "a.npz"
    arrays = _arrays()
    sums = cachefile.checksums(arrays)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] += 1
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=rf"^checksum mismatch in {key}$"):
        cachefile.load_arrays(path, sums)


def test_a_changed_dtype_with_the_same_bytes_is_a_mismatch(tmp_path):
    path = tmp_path / "a.npz"
    a = np.arange(4, dtype=np.int32)
    sums = cachefile.checksums({"a": a})
    np.savez(path, a=a.view(np.float32))
    with pytest.raises(ValueError, match="checksum mismatch in a"):
        cachefile.load_arrays(path, sums)

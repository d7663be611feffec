"""Avatar side of the lite engine: landmarks, mouth/blink banks, renderer, cache."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from livecam.avatar import store
from livecam.avatar.face import FaceRenderer
from livecam.avatar.landmarks import NoFaceError, detect_face
from livecam.avatar.model import Avatar
from livecam.avatar.store import (
    AvatarError,
    build_avatar,
    list_avatars,
    load_avatar,
    prepare_avatar,
    remove_avatar,
)
from tests.helpers import PHOTOS


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def built(request: pytest.FixtureRequest) -> Avatar:
    """Both bundled photos, built once per module without touching any cache."""
    return build_avatar(request.param, PHOTOS[request.param])


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LIVECAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def face_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small face photo (a crop of portrait.jpg): fast to prepare."""
    image = cv2.imread(str(PHOTOS["portrait"]))
    path = tmp_path_factory.mktemp("photo") / "me.png"
    cv2.imwrite(str(path), cv2.resize(image[40:400, 150:480], (165, 180)))
    return path


def _inner_lips(avatar: Avatar) -> np.ndarray:
    """Boolean mask of the photo's inner-lip polygon (teeth in both bundled photos)."""
    mask = np.zeros(avatar.image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(avatar.landmarks[60:68]).astype(np.int32)], 1)
    return mask.astype(bool)


def _teeth_and_dark(image: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    s, v = hsv[..., 1][region].astype(int), hsv[..., 2][region].astype(int)
    return float(((s < 40) & (v > 150)).mean()), float((v < 60).mean())


# landmarks


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_landmarks_on_bundled_photos(name: str) -> None:
    det = detect_face(cv2.imread(str(PHOTOS[name])))
    assert det.landmarks.shape == (68, 2) and det.landmarks.dtype == np.float32
    x, y, w, h = det.box
    assert w > 60 and h > 60 and det.faces_found == 1
    mouth = det.landmarks[48:68]
    assert (mouth[:, 1] > y + h / 2).all() and (mouth[:, 1] < y + h * 1.2).all()
    assert (mouth[:, 0] > x).all() and (mouth[:, 0] < x + w).all()


def test_a_phone_photo_stored_sideways_is_turned_by_its_exif_orientation(
    tmp_path: Path,
) -> None:
    sideways = Image.open(PHOTOS["portrait"]).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show (as phones write it)
    path = tmp_path / "phone.jpg"
    sideways.save(path, exif=exif.tobytes())
    avatar = build_avatar("phone", path)
    assert avatar.image.shape[:2] == (720, 576)  # upright, as the photo is shown
    lm = avatar.landmarks
    assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean()  # eyes, nose, mouth


@pytest.mark.parametrize(
    "turn", [cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE]
)
def test_a_photo_on_its_side_or_upside_down_is_turned_upright_with_a_warning(
    turn: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "turned.png"  # no orientation in the file: the pixels are turned
    cv2.imwrite(str(path), cv2.rotate(cv2.imread(str(PHOTOS["portrait"])), turn))
    with caplog.at_level(logging.WARNING, logger="livecam.avatar.store"):
        avatar = build_avatar("turned", path)
    message = f"the face in {path} was on its side or upside down: the photo was turned upright"
    assert avatar.warnings == [message] and [r.getMessage() for r in caplog.records] == [message]
    upright = cv2.imread(str(PHOTOS["portrait"]))
    assert avatar.image.shape == upright.shape
    assert np.abs(avatar.image.astype(int) - upright).mean() < 1  # the photo as it was taken
    lm = avatar.landmarks
    assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean()  # eyes, nose, mouth


def test_no_face_raises(cache: Path, tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    image = cv2.merge([gradient, gradient, gradient])
    with pytest.raises(NoFaceError):
        detect_face(image)
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), image)
    with pytest.raises(AvatarError, match=r"no face found in .*wall\.png"):
        prepare_avatar("wall", path)


def test_unreadable_photo(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(AvatarError, match=r"broken\.jpg"):
        prepare_avatar("broken", path)


# banks and renderer


def test_bank_layout(built: Avatar) -> None:
    for bank in (built.mouth, built.eyes):
        w, h = bank.size
        assert bank.patches.dtype == np.uint8 and bank.mask.shape == (h, w, 1)
        assert bank.x + w <= built.image.shape[1] and bank.y + h <= built.image.shape[0]
        assert bank.mask.max() == pytest.approx(1.0) and bank.mask[0].max() == 0.0
    assert built.eyes.y + built.eyes.size[1] <= built.mouth.y  # ROIs do not overlap
    x, _, w, _ = built.mouth_box()
    assert built.mouth.x <= x and x + w <= built.mouth.x + built.mouth.size[0]


def test_closed_lips_at_zero_open_mouth_at_one(built: Avatar) -> None:
    region = _inner_lips(built)
    teeth_photo, _ = _teeth_and_dark(built.image, region)
    assert teeth_photo > 0.25  # both photos smile with teeth showing
    renderer = FaceRenderer(built)
    teeth0, dark0 = _teeth_and_dark(renderer.render(0.0, 0.0, 0.0), region)
    assert teeth0 < 0.05 and dark0 < 0.02  # lips meet: no teeth, no mouth cavity
    x, y, w, h = built.mouth_box()
    lips = np.zeros(region.shape, bool)
    lips[y : y + h + w // 2, x : x + w] = True  # room for the jaw drop
    dark = [_teeth_and_dark(renderer.render(o, 0.0, 0.0), lips)[1] for o in np.linspace(0, 1, 6)]
    assert all(b > a for a, b in itertools.pairwise(dark)), dark
    assert dark[-1] > 0.05, dark  # a visibly open mouth


def test_render_is_deterministic_and_local(built: Avatar) -> None:
    renderer = FaceRenderer(built)
    neutral = renderer.render(0.0, 0.0, 0.0)
    assert neutral.shape == built.image.shape and neutral.dtype == np.uint8
    rng = np.random.default_rng(1)
    for o, w, b in rng.uniform([0, -1, 0], [1, 1, 1], size=(20, 3)):
        frame = renderer.render(o, w, b)
    assert not np.array_equal(frame, neutral)
    again = renderer.render(0.0, 0.0, 0.0)
    assert np.array_equal(again, neutral)
    touched = np.zeros(neutral.shape[:2], bool)
    for bank in (built.mouth, built.eyes):
        w, h = bank.size
        touched[bank.y : bank.y + h, bank.x : bank.x + w] = True
    assert np.array_equal(neutral[~touched], built.image[~touched])
    clipped = renderer.render(5.0, -7.0, 2.0)
    assert np.array_equal(clipped, renderer.render(1.0, -1.0, 1.0))


def test_blink_closes_the_eyes(built: Avatar) -> None:
    renderer = FaceRenderer(built)
    open_eyes = renderer.render(0.0, 0.0, 0.0).copy()
    shut = renderer.render(0.0, 0.0, 1.0)
    lm = built.landmarks
    for upper, lower in (([37, 38], [41, 40]), ([43, 44], [47, 46])):
        xy = np.round((lm[upper] * 0.35 + lm[lower] * 0.65).mean(0)).astype(int)
        # the iris (dark) is covered by eyelid skin (brighter)
        assert int(shut[xy[1], xy[0]].sum()) > int(open_eyes[xy[1], xy[0]].sum()) + 60


# cache


def test_cache_round_trip(cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_avatar("me", face_crop)
    manifest = json.loads((cache / "avatars" / "me" / "manifest.json").read_text())
    assert manifest["engines"] == ["lite"] and manifest["kind"] == "prepared"
    assert set(manifest["arrays"]) >= {"image", "mouth_patches", "eyes_patches"}

    def no_build(*args: object) -> None:
        raise AssertionError("cache should have been used")

    monkeypatch.setattr(store, "build_avatar", no_build)
    second = load_avatar("me")
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.mouth.patches, second.mouth.patches)
    assert np.array_equal(first.eyes.mask, second.eyes.mask)
    assert (second.mouth.x, second.mouth.y) == (first.mouth.x, first.mouth.y)
    pairs = [(first.landmarks, second.landmarks), (first.mouth.mask, second.mouth.mask),
             (first.eyes.mask, second.eyes.mask)]  # fmt: skip
    for fresh, cached in pairs:
        assert cached.dtype == fresh.dtype == np.float32  # what the renderer is built for
    assert second.name == "me"
    assert [(a.name, a.kind, a.status, a.source) for a in list_avatars() if a.name == "me"] == [
        ("me", "prepared", "ready", face_crop.resolve())
    ]


def test_only_valid_names_with_a_cache_are_listed(cache: Path, face_crop: Path) -> None:
    prepare_avatar("me", face_crop)
    root = cache / "avatars"
    (root / "stray").write_text("not a cache")  # a valid name, but a file
    (root / "ghost").symlink_to(".ghost~v-gone")  # a pointer to no version
    shutil.copytree(root / os.readlink(root / "me"), root / "bad name")  # a cache, badly named
    assert [a.name for a in list_avatars()] == ["astronaut", "me", "portrait"]


def test_corrupt_cache_is_rebuilt(
    cache: Path, face_crop: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_avatar("me", face_crop)
    npz = cache / "avatars" / "me" / "arrays.npz"
    data = bytearray(npz.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    npz.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = load_avatar("me")
    assert "damaged" in caplog.text
    assert np.array_equal(first.mouth.patches, again.mouth.patches)
    npz.write_bytes(b"garbage")
    assert np.array_equal(load_avatar("me").image, first.image)


def test_stale_cache_is_rebuilt(
    cache: Path, face_crop: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photo = tmp_path / "mine.png"
    shutil.copy(face_crop, photo)
    prepare_avatar("mine", photo)
    image = cv2.imread(str(photo))
    cv2.imwrite(str(photo), cv2.flip(image, 1))  # new source bytes
    assert [a.status for a in list_avatars() if a.name == "mine"] == ["stale"]
    with caplog.at_level(logging.WARNING):
        flipped = load_avatar("mine")
    assert "changed" in caplog.text
    assert np.array_equal(flipped.image, cv2.flip(image, 1))

    manifest_path = cache / "avatars" / "mine" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 0
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_avatar("mine")
    assert "format" in caplog.text
    assert json.loads(manifest_path.read_text())["format_version"] == store.FORMAT_VERSION


def test_missing_source_says_how_to_fix(cache: Path, face_crop: Path, tmp_path: Path) -> None:
    photo = tmp_path / "gone.png"
    shutil.copy(face_crop, photo)
    prepare_avatar("gone", photo)
    photo.unlink()
    with pytest.raises(AvatarError, match=r"livecam avatars prepare gone --from PHOTO_OR_CLIP"):
        load_avatar("gone")


def test_unknown_avatar_lists_names(cache: Path) -> None:
    with pytest.raises(AvatarError, match="astronaut, portrait"):
        load_avatar("nobody")
    with pytest.raises(AvatarError, match="invalid avatar name"):
        load_avatar("../etc")


def test_bundled_avatar_prepared_on_first_use_and_removed(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = tmp_path / "bundled"
    (bundled / "bob").mkdir(parents=True)
    image = cv2.resize(cv2.imread(str(PHOTOS["portrait"]))[40:400, 150:480], (165, 180))
    cv2.imwrite(str(bundled / "bob" / "bob.jpg"), image)
    (bundled / "bob" / "avatar.toml").write_text(
        'name = "bob"\nsource = "bob.jpg"\ndescription = "test face"\nlicense = "PD"\n'
    )
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(bundled))
    assert [(a.name, a.kind, a.status) for a in list_avatars()] == [
        ("bob", "bundled", "not prepared")
    ]
    avatar = load_avatar("bob")
    assert avatar.image.shape == image.shape
    assert list_avatars()[0].status == "ready"
    manifest = cache / "avatars" / "bob" / "manifest.json"
    manifest.write_text("{")  # a bundled avatar's damaged cache: its source is still known
    assert [(a.name, a.kind, a.status) for a in list_avatars()] == [("bob", "bundled", "damaged")]
    remove_avatar("bob")
    assert list_avatars()[0].status == "not prepared"
    with pytest.raises(AvatarError):
        remove_avatar("bob")


def test_tall_photos_are_downscaled(cache: Path, face_crop: Path, tmp_path: Path) -> None:
    image = cv2.imread(str(face_crop))
    big = cv2.resize(image, None, fx=5, fy=5)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), big)
    assert store.read_image(path).shape[0] == store.MAX_HEIGHT


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every real (re)build of an avatar from its source."""
    calls: list[str] = []
    real = store.build_avatar

    def counting(name: str, source: Path, *args: int) -> Avatar:
        calls.append(name)
        return real(name, source, *args)

    monkeypatch.setattr(store, "build_avatar", counting)
    return calls


def _rewrite_arrays(npz: Path, change) -> None:
    """Rewrite arrays.npz as a valid zip (CRCs intact) after `change(arrays)`."""
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with npz.open("wb") as fh:
        np.savez(fh, **arrays)


def _brighten(arrays: dict) -> None:
    arrays["image"] = np.clip(arrays["image"].astype(int) + 40, 0, 255).astype(np.uint8)


def _drop_eyes(arrays: dict) -> None:
    del arrays["eyes_mask"]


def _add_extra(arrays: dict) -> None:
    arrays["extra"] = np.zeros(3)


@pytest.mark.parametrize("change", [_brighten, _drop_eyes, _add_extra])
def test_valid_zip_with_other_arrays_is_rebuilt(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch, change
) -> None:
    """Only the per-array sha256 (or the array set) can tell: zipfile's CRCs all match."""
    first = prepare_avatar("me", face_crop)
    _rewrite_arrays(cache / "avatars" / "me" / "arrays.npz", change)
    builds = _count_builds(monkeypatch)
    again = load_avatar("me")
    assert builds == ["me"]
    assert np.array_equal(again.image, first.image)
    assert np.array_equal(again.eyes.mask, first.eyes.mask)
    load_avatar("me")  # the rebuilt cache is whole again
    assert builds == ["me"]


def test_changed_build_parameters_make_the_cache_stale(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_avatar("me", face_crop)
    manifest_path = cache / "avatars" / "me" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["params"]["max_height"] = store.MAX_HEIGHT + 1  # built by another version
    manifest_path.write_text(json.dumps(manifest))
    assert [a.status for a in list_avatars() if a.name == "me"] == ["stale"]
    builds = _count_builds(monkeypatch)
    load_avatar("me")
    assert builds == ["me"]
    assert json.loads(manifest_path.read_text())["params"] == store.build_params()
    assert [a.status for a in list_avatars() if a.name == "me"] == ["ready"]


def test_a_manifest_off_its_schema_reads_as_damaged(cache: Path, face_crop: Path) -> None:
    """Each field of the manifest's schema is checked: a wrong type is a damaged cache."""
    prepare_avatar("me", face_crop)
    path = cache / "avatars" / "me" / "manifest.json"
    good = json.loads(path.read_text())
    assert store._read_manifest("me") == good and not store._damaged("me")
    bad = [{**good, key: None} for key in store._MANIFEST_TYPES] + [
        {**good, "kind": "borrowed"},
        {**good, "arrays": {**good["arrays"], "image": 1}},
        {**good, "warnings": ["ok", 2]},
        [good],
    ]
    for manifest in bad:
        path.write_text(json.dumps(manifest))
        assert store._read_manifest("me") is None, manifest
        assert store._damaged("me")
    path.write_text(json.dumps({**good, "kind": "bundled"}))
    assert store._read_manifest("me") is not None
    path.write_text("{")
    assert store._read_manifest("me") is None and store._damaged("me")
    path.unlink()
    assert store._read_manifest("me") is None and store._damaged("me")
    assert [(a.name, a.status) for a in list_avatars() if a.name == "me"] == [("me", "damaged")]


def test_no_cache_is_not_damaged(cache: Path) -> None:
    assert store._read_manifest("me") is None and not store._damaged("me")


def test_a_cached_avatar_keeps_its_prepare_warnings(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_avatar("me", face_crop)
    path = cache / "avatars" / "me" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["warnings"] = ["2 faces found in me.png; using the largest one"]
    path.write_text(json.dumps(manifest))  # warnings are not covered by the array checksums
    builds = _count_builds(monkeypatch)
    assert load_avatar("me").warnings == manifest["warnings"]
    assert builds == []


def test_a_missing_source_makes_the_cache_stale_and_says_so(
    cache: Path, face_crop: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "gone.png"
    shutil.copy(face_crop, photo)
    prepare_avatar("gone", photo)
    photo.unlink()
    assert [a.status for a in list_avatars() if a.name == "gone"] == ["stale"]
    with pytest.raises(AvatarError) as err:
        load_avatar("gone")
    assert str(err.value) == (
        f"avatar 'gone' must be rebuilt (source {photo} is missing) but its source {photo} "
        "is gone: run `livecam avatars prepare gone --from PHOTO_OR_CLIP`"
    )


def test_stale_reasons_name_what_changed(face_crop: Path, tmp_path: Path) -> None:
    params = store.build_params()
    manifest = {"format_version": store.FORMAT_VERSION, "params": params,
                "source_sha256": store.sha256_file(face_crop)}  # fmt: skip
    assert store._stale_reason(manifest, face_crop) is None
    old = {**manifest, "format_version": 0}
    assert store._stale_reason(old, face_crop) == f"cache format 0 != {store.FORMAT_VERSION}"
    other = {**manifest, "params": {**params, "max_height": 1}}
    assert store._stale_reason(other, face_crop) == "build parameters changed"
    # a cache from before the landmarker was recorded (dlib's landmarks) is rebuilt once
    dlib_era = {**manifest, "params": {k: v for k, v in params.items() if k != "landmarker"}}
    assert store._stale_reason(dlib_era, face_crop) == "build parameters changed"
    changed = {**manifest, "source_sha256": "0" * 64}
    assert store._stale_reason(changed, face_crop) == f"source {face_crop} changed"
    gone = tmp_path / "gone.png"
    assert store._stale_reason(manifest, gone) == f"source {gone} is missing"


NO_SPACE = ("no space left to save avatar 'me' in /c: free some disk space (or set "
            "LIVECAM_CACHE_DIR to another disk) and try again")  # fmt: skip


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.ENOSPC, NO_SPACE),
        (errno.EDQUOT, NO_SPACE),
        (errno.EACCES, "cannot save avatar 'me' in /c: Permission denied"),
    ],
)
def test_write_errors_say_what_to_do(err: int, expected: str) -> None:
    message = store._write_error("me", Path("/c"), OSError(err, os.strerror(err)))
    assert message == expected
    assert (
        store._write_error("me", Path("/c"), OSError("odd")) == "cannot save avatar 'me' in /c: odd"
    )


def test_prepare_reuses_a_matching_cache_unless_forced(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_avatar("me", face_crop)
    builds = _count_builds(monkeypatch)
    prepare_avatar("me", face_crop)
    assert builds == []
    prepare_avatar("me", face_crop, force=True)
    assert builds == ["me"]


@pytest.mark.parametrize("kind", ["plain folder", "dangling link"])
def test_remove_takes_an_old_plain_folder_or_a_dangling_link(cache: Path, kind: str) -> None:
    path = cache / "avatars" / "me"
    path.parent.mkdir(parents=True)
    if kind == "plain folder":  # the layout before version folders
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    else:  # its version folder was deleted by hand
        path.symlink_to(".me~gone")
    remove_avatar("me")
    assert not path.is_symlink() and not path.exists()
    with pytest.raises(AvatarError, match=r"^avatar 'me' has no cache in .*avatars$"):
        remove_avatar("me")


def test_remove_waits_for_a_writer_of_the_same_name(cache: Path, face_crop: Path) -> None:
    from livecam.avatar import cachedir

    prepare_avatar("me", face_crop)
    root = cache / "avatars"
    with cachedir.locked(root, "me"):
        remover = threading.Thread(target=remove_avatar, args=("me",))
        remover.start()
        remover.join(timeout=1.0)  # a slow machine can only make this pass wrongly, never fail
        assert remover.is_alive() and (root / "me").exists()
    remover.join()
    assert not (root / "me").exists()


def _bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str,
            photo: Path | None = None) -> Path:  # fmt: skip
    """A bundled avatar "bob" (its avatar.toml, and `photo` as bob.png) in a folder that
    LIVECAM_AVATARS_DIR now names; bob's folder."""
    bob = tmp_path / "bundled" / "bob"
    bob.mkdir(parents=True)
    if photo is not None:
        shutil.copy(photo, bob / "bob.png")
    (bob / "avatar.toml").write_text(toml)
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(bob.parent))
    return bob


def test_preparing_a_bundled_avatar_from_its_own_photo_keeps_it_bundled(
    cache: Path, face_crop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = 'name = "bob"\nsource = "bob.png"\ndescription = "test face"\n'
    bob = _bundle(tmp_path, monkeypatch, toml, face_crop)
    manifest_path = cache / "avatars" / "bob" / "manifest.json"
    prepare_avatar("bob", bob / "bob.png")
    manifest = json.loads(manifest_path.read_text())
    assert (manifest["kind"], manifest["description"]) == ("bundled", "test face")
    info = [(a.kind, a.status, a.description) for a in list_avatars() if a.name == "bob"]
    assert info == [("bundled", "ready", "test face")]
    prepare_avatar("bob", face_crop)  # another photo under the bundled name: the user's own
    manifest = json.loads(manifest_path.read_text())
    assert (manifest["kind"], manifest["description"]) == ("prepared", "")
    assert [a.kind for a in list_avatars() if a.name == "bob"] == ["prepared"]


def test_a_clip_avatars_frames_and_motion_round_trip_through_the_cache(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    still = build_avatar("me", face_crop)
    n, (h, w) = 3, still.image.shape[:2]
    frames = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    motion = np.tile(np.array([[1, 0, 2], [0, 1, -3]], np.float32), (n, 1, 1))
    clip = replace(still, frames=frames, motion=motion, clip_rate=12.5)
    store._write_cache(clip, face_crop, "prepared", "")
    builds = _count_builds(monkeypatch)
    loaded = load_avatar("me")
    assert builds == []
    assert np.array_equal(loaded.frames, frames) and np.array_equal(loaded.motion, motion)
    assert loaded.clip_rate == 12.5
    assert (loaded.eyes.x, loaded.eyes.y) == (still.eyes.x, still.eyes.y)
    assert np.array_equal(loaded.landmarks, still.landmarks)
    assert np.array_equal(loaded.mouth.mask, still.mouth.mask)
    store._write_cache(still, face_crop, "prepared", "")  # a still has none of them
    loaded = load_avatar("me")
    assert loaded.frames is None and loaded.motion is None and loaded.clip_rate == 0.0


def test_a_bundled_avatar_without_a_description_has_an_empty_one(
    cache: Path, face_crop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = _bundle(tmp_path, monkeypatch, 'name = "bob"\nsource = "bob.png"\n', face_crop)
    prepare_avatar("bob", bob / "bob.png")
    manifest = json.loads((cache / "avatars" / "bob" / "manifest.json").read_text())
    assert (manifest["kind"], manifest["description"]) == ("bundled", "")
    assert [(a.kind, a.description) for a in list_avatars()] == [("bundled", "")]


def test_a_damaged_prepared_avatar_says_how_to_make_it_again(
    cache: Path, face_crop: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prepare_avatar("me", face_crop)
    (cache / "avatars" / "me" / "manifest.json").write_text("{")  # its source is unknown now
    root = cache / "avatars"
    with pytest.raises(AvatarError) as err:
        load_avatar("me")
    assert str(err.value) == (
        f"the cache of avatar 'me' in {root} is damaged: make it again with "
        "`livecam avatars prepare me --from PHOTO_OR_CLIP --force`"
    )
    info = list_avatars()
    assert [a.name for a in info] == ["astronaut", "me", "portrait"]  # and the ones after it
    assert info[1] == store.AvatarInfo("me", "prepared", "damaged", None, "prepare it again")


def test_unknown_avatar_message_is_exact(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AvatarError) as err:
        load_avatar("nobody")
    assert str(err.value) == (
        "unknown avatar 'nobody'; available: astronaut, portrait. "
        "Make one with `livecam avatars prepare nobody --from PHOTO_OR_CLIP`"
    )
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(tmp_path / "none"))
    with pytest.raises(AvatarError, match=r"^unknown avatar 'nobody'; available: none\. Make"):
        load_avatar("nobody")


def test_a_bundled_avatars_first_use_is_quiet_and_a_damaged_cache_warns(
    cache: Path, face_crop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    bob = _bundle(tmp_path, monkeypatch, 'name = "bob"\nsource = "bob.png"\n', face_crop)
    with caplog.at_level(logging.WARNING, logger="livecam.avatar.store"):
        load_avatar("bob")
    assert caplog.records == []
    (cache / "avatars" / "bob" / "manifest.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="livecam.avatar.store"):
        load_avatar("bob")
    assert [r.getMessage() for r in caplog.records] == [
        f"avatar 'bob': cache damaged; rebuilding from {bob / 'bob.png'}"
    ]


def test_preparing_from_a_copy_elsewhere_records_the_new_path(
    cache: Path, face_crop: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(face_crop, first)
    shutil.copy(face_crop, second)  # same bytes: only the path tells them apart
    prepare_avatar("me", first)
    prepare_avatar("me", second)
    manifest = json.loads((cache / "avatars" / "me" / "manifest.json").read_text())
    assert manifest["source"] == str(second.resolve())
    first.unlink()  # the old photo can go: the avatar now comes from the new one
    assert [a.status for a in list_avatars() if a.name == "me"] == ["ready"]


def test_prepare_over_damaged_arrays_warns_and_rebuilds(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    prepare_avatar("me", face_crop)
    (cache / "avatars" / "me" / "arrays.npz").write_bytes(b"garbage")
    builds = _count_builds(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="livecam.avatar.store"):
        prepare_avatar("me", face_crop)
    assert builds == ["me"]
    [message] = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"avatar 'me' cache damaged \(unreadable arrays\.npz: .+\); rebuilding",
                        message)  # fmt: skip


def test_a_photo_of_two_people_gives_the_larger_face_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    portrait, astronaut = (cv2.imread(str(PHOTOS[n])) for n in ("portrait", "astronaut"))
    width = portrait.shape[1]  # 576: the portrait's face (162 px box) beside the astronaut's (103)
    group = np.full((720, width + 512, 3), 128, np.uint8)
    group[:, :width], group[100:612, width:] = portrait, astronaut
    path = tmp_path / "group.png"
    cv2.imwrite(str(path), group)
    with caplog.at_level(logging.WARNING, logger="livecam.avatar.store"):
        avatar = build_avatar("group", path)
    message = f"2 faces found in {path}; using the largest one"
    assert avatar.warnings == [message]
    assert [r.getMessage() for r in caplog.records] == [message]
    assert avatar.landmarks[:, 0].max() < width  # the portrait's face


def test_a_failed_write_keeps_the_old_cache_and_leaves_no_version(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_avatar("me", face_crop)
    root = cache / "avatars"
    before = sorted(p.name for p in root.iterdir())

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(store.cachefile, "save_arrays", full)
        with pytest.raises(
            AvatarError, match=rf"^no space left to save avatar 'me' in {re.escape(str(root))}: "
        ):
            prepare_avatar("me", face_crop, force=True)
    assert sorted(p.name for p in root.iterdir()) == before
    assert np.array_equal(load_avatar("me").image, first.image)


def test_the_manifest_records_when_and_for_which_engines(cache: Path, face_crop: Path) -> None:
    prepare_avatar("me", face_crop, force=True)
    manifest = json.loads((cache / "avatars" / "me" / "manifest.json").read_text())
    created = datetime.fromisoformat(manifest["created"])
    assert created.tzinfo is not None and created.microsecond == 0
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600  # made by this run
    assert manifest["engines"] == ["lite"] and manifest["name"] == "me"
    assert manifest["source"] == str(face_crop.resolve())
    assert manifest["params"] == store.build_params()


def test_preparing_the_bundled_astronaut_is_quiet_about_its_false_face(cache: Path) -> None:
    photo = store.bundled_root() / "astronaut" / "astronaut.png"
    assert prepare_avatar("astronaut", photo).warnings == []
    assert load_avatar("astronaut").warnings == []


def test_a_writer_waits_for_the_lock_of_its_name(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livecam.avatar import cachedir

    first = prepare_avatar("me", face_crop)
    monkeypatch.setattr(store, "build_avatar", lambda *args: first)  # only the write is slow
    root = cache / "avatars"
    link = os.readlink(root / "me")
    with cachedir.locked(root, "me"):  # a remover or another writer of "me"
        writer = threading.Thread(
            target=prepare_avatar, args=("me", face_crop), kwargs={"force": True}
        )
        writer.start()
        writer.join(timeout=1.0)  # a slow machine can only make this pass wrongly, never fail
        assert writer.is_alive() and os.readlink(root / "me") == link
    writer.join()
    assert os.readlink(root / "me") != link  # then it wrote a new version
    assert np.array_equal(load_avatar("me").image, first.image)


def test_an_image_over_the_pixel_limit_is_named_in_the_error(cache: Path, tmp_path: Path) -> None:
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("1", (8001, 8000)).save(big)  # 64 MP of one bit: a small file
    with pytest.raises(
        AvatarError, match=rf"^image {re.escape(str(big))} is 8001x8000: more than 64 "
    ):
        prepare_avatar("big", big)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (1440, 400, (720, 200)),
        (720, 1500, (720, 1500)),
        (600, 1500, (600, 1500)),
        (2160, 1, (720, 1)),
    ],
)
def test_stills_are_scaled_to_720_rows_by_their_height_only(
    tmp_path: Path, height: int, width: int, expected: tuple[int, int]
) -> None:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))
    image = store.read_image(path)
    assert image.shape == (*expected, 3) and image.dtype == np.uint8


def test_a_downscaled_still_is_averaged_not_sampled(tmp_path: Path) -> None:
    """Alternate black and white rows, scaled by 1/3: each output row averages three input
    rows (85 or 170); sampling would keep pure black and white (aliasing)."""
    rows = np.zeros((2160, 8, 3), np.uint8)
    rows[1::2] = 255
    path = tmp_path / "stripes.png"
    cv2.imwrite(str(path), rows)
    image = store.read_image(path)
    assert image.shape[0] == 720
    assert set(np.unique(image)) <= {85, 170}


def test_a_still_opencv_cannot_decode_is_refused_by_name(cache: Path, tmp_path: Path) -> None:
    from PIL import Image

    tga = tmp_path / "face.tga"  # whole for PIL (the damage check), not for cv2.imread
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tga)
    with pytest.raises(AvatarError, match=rf"^cannot read image {re.escape(str(tga))}: not a "):
        prepare_avatar("tga", tga)
    missing = tmp_path / "gone.png"
    with pytest.raises(AvatarError, match=rf"^cannot read image {re.escape(str(missing))}: not a "):
        store.read_image(missing)


def test_a_decompression_bomb_is_refused_by_name(cache: Path, tmp_path: Path) -> None:
    """A PNG header declaring 20000x20000 pixels (PIL refuses it before our own limit)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    message = f"image {bomb} is larger than 64 megapixels; scale it down first"
    with pytest.raises(AvatarError, match=f"^{re.escape(message)}$"):
        prepare_avatar("bomb", bomb)


def _a_clip(monkeypatch: pytest.MonkeyPatch, read=None, track=None):
    """Clip decoding and tracking stood in for: three aligned frames of the astronaut, each
    moved a little, with their landmarks and head motion (`read`/`track` may raise)."""
    photo = load_avatar("astronaut")
    aligned = np.stack([np.roll(photo.image, 2 * i, axis=1) for i in range(3)])
    points = np.stack([photo.landmarks.astype(np.float64) + np.array([2 * i, 0]) for i in range(3)])
    motion = np.tile(np.eye(2, 3, dtype=np.float32), (3, 1, 1))
    decoded = [np.roll(frame, 1, axis=0) for frame in aligned]  # before alignment

    def tracked(frames):
        assert frames is decoded
        return "tracks"

    def stabilized(frames, tracks):
        assert frames is decoded and tracks == "tracks"
        return aligned, motion, points

    monkeypatch.setattr(store.video, "read_clip", read or (lambda path: (decoded, 24.0)))
    monkeypatch.setattr(store.video, "track_landmarks", track or tracked)
    monkeypatch.setattr(store.video, "stabilize", stabilized)
    return aligned, points, motion


def test_a_clip_avatar_is_built_on_its_first_aligned_frame(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    aligned, points, motion = _a_clip(monkeypatch)
    source = tmp_path / "me.mp4"
    with caplog.at_level("INFO", logger=store.log.name):
        av = store.build_avatar("me", source)
    assert av.name == "me" and av.is_video and av.warnings == []
    assert np.array_equal(av.image, aligned[0]) and av.landmarks.dtype == np.float32
    assert np.array_equal(av.landmarks, points[0].astype(np.float32))
    assert av.frames is aligned and av.motion is motion and av.clip_rate == 24.0
    assert caplog.messages == [f"avatar 'me': 3 frames of {source}"]
    photo = load_avatar("astronaut")  # frame 0 is its photo: the banks are the photo's
    for got, want in ((av.mouth, photo.mouth), (av.eyes, photo.eyes)):
        assert (got.x, got.y) == (want.x, want.y) and np.array_equal(got.patches, want.patches)


def test_a_clip_that_cannot_become_an_avatar_is_one_clear_error(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "me.mp4"

    def unreadable(path: Path):
        raise store.video.VideoError(f"cannot read video {path}")

    def faceless(frames):
        raise NoFaceError("no face")

    _a_clip(monkeypatch, read=unreadable)
    with pytest.raises(AvatarError) as err:
        store.build_avatar("me", source)
    assert str(err.value) == f"cannot read video {source}"
    _a_clip(monkeypatch, track=faceless)
    with pytest.raises(AvatarError) as err:
        store.build_avatar("me", source)
    assert str(err.value) == (
        f"no face found in the first frame of {source}: start the clip on one clearly "
        "visible, frontal face"
    )


def test_the_cache_and_bundled_folders_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("LIVECAM_CACHE_DIR", raising=False)
    monkeypatch.delenv("LIVECAM_AVATARS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert store.cache_root() == tmp_path / "livecam"
    shipped = Path(store.__file__).resolve().parent.parent / "avatars"  # livecam/avatars
    assert store.bundled_root() == shipped and (shipped / "astronaut" / "avatar.toml").is_file()


def test_a_bundled_avatars_cache_outlives_its_bundle(
    cache: Path, face_crop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = _bundle(tmp_path, monkeypatch, 'source = "bob.png"\ndescription = "Bob"\n', face_crop)
    first = load_avatar("bob")
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(tmp_path / "elsewhere"))  # bundle gone
    source = (bob / "bob.png").resolve()
    assert [(a.name, a.kind, a.status, a.source, a.description) for a in list_avatars()] == [
        ("bob", "prepared", "ready", source, "Bob")
    ]
    builds = _count_builds(monkeypatch)
    assert np.array_equal(load_avatar("bob").image, first.image) and builds == []


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (b'source = "p.jpg"\n[x', "cannot read {path}: "),
        (b'description = "no source"', "{path} is damaged: it needs source (a file name), and "
         "description, where given, as a string"),
        (b'source = "p.jpg"\ndescription = 2', "{path} is damaged: it needs source"),
    ],
)  # fmt: skip
def test_a_bundled_avatar_toml_that_cannot_be_used_is_named(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: bytes, problem: str
) -> None:
    path = tmp_path / "bundled" / "bad" / "avatar.toml"
    path.parent.mkdir(parents=True)
    path.write_bytes(toml)
    monkeypatch.setenv("LIVECAM_AVATARS_DIR", str(tmp_path / "bundled"))
    with pytest.raises(AvatarError) as err:
        load_avatar("bad")
    assert str(err.value).startswith(problem.format(path=path))


def test_a_bundled_avatar_without_its_photo_says_so(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = _bundle(tmp_path, monkeypatch, 'source = "bob.png"\n')  # and no photo
    with pytest.raises(AvatarError) as err:
        load_avatar("bob")
    assert str(err.value) == (
        f"avatar 'bob' must be rebuilt (not prepared yet) but its source "
        f"{bob / 'bob.png'} is gone: run "
        "`livecam avatars prepare bob --from PHOTO_OR_CLIP`"
    )


def test_a_cache_folder_gone_before_its_arrays_are_read(cache: Path, face_crop: Path) -> None:
    prepare_avatar("me", face_crop)
    manifest = store._read_manifest("me")
    remove_avatar("me")  # by another process, between the manifest and the arrays
    with pytest.raises(ValueError, match=r"^the cache folder is gone$"):
        store._load_cache("me", manifest)


@pytest.mark.parametrize(
    ("module", "name"),
    [(store, "MAX_HEIGHT"), (store.video, "MAX_SECONDS"), (store.video, "FRAME_RATE"),
     (store.video, "MAX_HEIGHT")],
)  # fmt: skip
def test_each_build_parameter_is_in_the_cache_key(
    cache: Path, face_crop: Path, monkeypatch: pytest.MonkeyPatch, module, name: str
) -> None:
    """A cache built with other limits (another livecam version) is rebuilt."""
    prepare_avatar("me", face_crop)
    monkeypatch.setattr(module, name, getattr(module, name) + 1)
    assert [a.status for a in list_avatars() if a.name == "me"] == ["stale"]

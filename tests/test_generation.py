"""Reproduction and near-copy counting on images whose similarities are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import gaussian

from nemo_surgery.generation import COPY_SSIM, nearest_and_copy_share, nearest_share, ssim


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = gaussian(rng.random((64, 64, 3)), sigma=2, channel_axis=-1)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def test_copy_is_stricter_than_nearest() -> None:
    train = {"a": _photo(0), "b": _photo(1)}
    rng = np.random.default_rng(2)
    copy = np.clip(train["a"] + rng.normal(0, 0.02, train["a"].shape), 0, 1).astype(np.float32)
    # Closer to a than to b, but far from a copy of it: a faded, noisy version.
    faded = np.clip(0.35 * train["a"] + 0.65 * 0.5 + rng.normal(0, 0.15, copy.shape), 0, 1).astype(np.float32)
    assert ssim(copy, train["a"]) >= COPY_SSIM > ssim(faded, train["a"]) > ssim(faded, train["b"])
    images = np.stack([copy, faded, train["b"]])
    assert nearest_share(images, "a", train) == 2 / 3
    assert nearest_and_copy_share(images, "a", train, train["a"]) == (2 / 3, 1 / 3)
    # The bar is a parameter: at 0 every image whose nearest is `a` counts.
    assert nearest_and_copy_share(images, "a", train, train["a"], threshold=0.0) == (2 / 3, 2 / 3)


def test_preservation_against_seed_noise_and_control() -> None:
    from nemo_surgery.generation import GenSettings
    from nemo_surgery.surgery.verify import preservation

    settings = GenSettings(steps=5, seeds=(0, 1, 2))
    # One prompt's seeds share its picture and differ in the rest, as a model's draws do.
    before = np.stack([np.stack([0.6 * _photo(i) + 0.4 * _photo(10 + 10 * i + s) for s in range(3)])
                       for i in range(2)])
    rng = np.random.default_rng(7)
    noisy = np.clip(before + rng.normal(0, 0.02, before.shape), 0, 1).astype(np.float32)
    other = np.stack([np.stack([_photo(100 + 10 * i + s) for s in range(3)]) for i in range(2)])

    same = preservation(before, before, None, settings)
    assert same["ssim_to_original"] == {"mean": 1.0, "median": 1.0, "min": 1.0} and same["changed"] == 0
    assert "random_control" not in same and same["prompts"] == 2 and same["seeds"] == [0, 1, 2]
    # Unrelated images are as far from the original's as another seed is: changed, on both prompts.
    moved = preservation(before, other, noisy, settings)
    assert moved["changed"] == 2 and moved["random_control"]["changed"] == 0
    assert moved["ssim_to_original"]["mean"] < moved["random_control"]["ssim_to_original"]["mean"] < 1
    assert [r["seed_to_seed"] for r in moved["rows"]] == [r["seed_to_seed"] for r in same["rows"]]
    # Whether each image is still its own prompt's: nearest to its own prompt's original among
    # the prompts' for the same seed. Unchanged: every one; the two prompts' images swapped: none,
    # though each is still an image the original draws; slight noise (the control): every one.
    assert (same["own_prompt_nearest"], same["chance"]) == (1.0, 0.5)
    apart = np.mean([ssim(before[0, k], before[1, k]) for k in range(3)])  # the two prompts, seed for seed
    assert same["prompt_to_prompt"] == pytest.approx(apart, abs=1e-4)
    swapped = preservation(before, before[::-1], noisy, settings)
    assert swapped["own_prompt_nearest"] == 0.0 and swapped["random_control"]["own_prompt_nearest"] == 1.0
    assert [r["own_prompt_nearest"] for r in swapped["rows"]] == [0.0, 0.0]
    # Verification keeps the images as 8-bit pixels: they are judged the same.
    from nemo_surgery.generation import to_uint8
    from nemo_surgery.surgery.verify import own_prompt_nearest

    for after in (before, before[::-1], noisy):
        assert np.array_equal(own_prompt_nearest(to_uint8(before), to_uint8(after)), own_prompt_nearest(before, after))


def test_nearest_search_compares_thumbnails() -> None:
    from nemo_surgery.generation import NEAREST_PX, Gallery, thumbnail

    big = {k: np.kron(_photo(s), np.ones((4, 4, 1), dtype=np.float32)) for k, s in (("a", 0), ("b", 1))}  # 256 px
    small = Gallery(big)
    assert small.size == (NEAREST_PX, NEAREST_PX) and list(small) == ["a", "b"]
    half = thumbnail(big["a"])
    assert half.shape == (NEAREST_PX, NEAREST_PX, 3)
    assert thumbnail(half) is half  # already small enough: as it is, not copied
    rng = np.random.default_rng(3)
    copy = np.clip(big["a"] + rng.normal(0, 0.01, big["a"].shape), 0, 1).astype(np.float32)
    images = np.stack([copy, big["b"]])
    # Full-size and ready-made candidates give the same answer; SSIM to the own image stays full size.
    assert nearest_share(images, "a", big) == nearest_share(images, "a", small) == 1 / 2
    assert nearest_and_copy_share(images, "a", small, big["a"]) == (1 / 2, 1 / 2)
    # Made from (key, image) pairs as they are loaded, one full-size image at a time: the same gallery.
    streamed = Gallery((k, big[k]) for k in ("a", "b"))
    assert list(streamed) == ["a", "b"] and np.array_equal(streamed.similarities(images), small.similarities(images))


def test_batched_nearest_search_is_scikit_images_ssim(monkeypatch) -> None:
    """The gallery scores every generation against every training image at once in torch; it must
    be `ssim` (scikit-image's) pair for pair, whatever the image size (odd ones included) and
    however the pairs are chunked, and pick the same nearest image."""
    import nemo_surgery.generation as generation
    from nemo_surgery.generation import Gallery, thumbnail

    rng = np.random.default_rng(5)
    for size in (16, 21, 200):
        # 256 px photos cut to size: 200 px is compared as 128 px thumbnails
        train = {f"t{i}": np.kron(_photo(i), np.ones((4, 4, 1), dtype=np.float32))[:size, :size] for i in range(6)}
        queries = np.stack([np.clip(train[f"t{i % 6}"] + rng.normal(0, 0.3, train["t0"].shape), 0, 1)
                            for i in range(4)]).astype(np.float32)
        want = np.array([[ssim(thumbnail(q), thumbnail(t)) for t in train.values()] for q in queries])
        got = Gallery(train).similarities(queries)
        assert got.shape == (4, 6) and np.abs(got - want).max() < 1e-5
        assert Gallery(train).nearest(queries) == [list(train)[k] for k in want.argmax(axis=1)]
        monkeypatch.setattr(generation, "PAIR_CHUNK_BYTES", 1)  # one pair at a time
        assert np.array_equal(Gallery(train).similarities(queries), got)
        monkeypatch.undo()
    empty = Gallery({})  # a corpus without training images: nothing to search, until asked
    assert len(empty) == 0 and empty.size == (0, 0)
    with pytest.raises(ValueError, match="no images"):
        empty.nearest(queries)

"""Reproduction and near-copy counting on images whose similarities are known by construction."""

from __future__ import annotations

import numpy as np
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

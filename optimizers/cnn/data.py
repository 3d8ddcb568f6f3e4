"""Calibration and evaluation data: scikit-learn digits splits, real sample photographs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 0


@dataclass(frozen=True)
class DigitsSplits:
    """The demo model's split (same seed and stratification as bench/train_demo_models.py)."""

    x_train: np.ndarray  # [N,1,8,8] float32, raw 0..16 intensities
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def calibration(self, count: int = 256) -> np.ndarray:
        """The first ``count`` training images (never the test split)."""
        return self.x_train[:count]


def digits_splits() -> DigitsSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target
    )
    return DigitsSplits(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def sample_photos() -> dict[str, np.ndarray]:
    """Real colour photographs shipped by scikit-image and scikit-learn (uint8 HxWx3)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "cat",
        "colorwheel",
        "logo",
        "stereo_motorcycle",
    ):
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            image = loader()
        except Exception:  # some images need a download (pooch) — skip those offline
            continue
        if isinstance(image, tuple):
            image = image[0]
        if image.ndim == 3 and image.shape[2] >= 3:
            photos[name] = np.ascontiguousarray(image[:, :, :3])
    for i, image in enumerate(load_sample_images().images):
        photos[f"sklearn_{i}"] = image
    return photos


def photo_crops(
    photos: dict[str, np.ndarray], size: int = 224, per_photo: int = 8, seed: int = SEED
) -> tuple[np.ndarray, list[str]]:
    """Resized random crops (scale 0.3-1.0, random flips) as normalized NCHW float32."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    batches, names = [], []
    for name, image in sorted(photos.items()):
        h, w = image.shape[:2]
        for k in range(per_photo):
            side = int(min(h, w) * (1.0 if k == 0 else rng.uniform(0.3, 1.0)))
            top = rng.integers(0, h - side + 1)
            left = rng.integers(0, w - side + 1)
            crop = image[top : top + side, left : left + side]
            if k % 2 == 1:
                crop = crop[:, ::-1]
            resized = resize(crop, (size, size), anti_aliasing=True, preserve_range=True)
            chw = (resized.astype(np.float32) / 255.0).transpose(2, 0, 1)
            batches.append((chw - IMAGENET_MEAN) / IMAGENET_STD)
            names.append(f"{name}#{k}")
    return np.stack(batches).astype(np.float32), names

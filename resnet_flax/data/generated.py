"""Generated JPEG folders in imagenette's original layout, built into a real TFDS dataset.

No images ship offline, but TFDS's own imagenette builder can run on generated files: its
download is replaced by a folder shaped like imagenette2-<size>.tgz (train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG). The result is what `tfds build imagenette` writes, so tests and the
input benchmark exercise the real reading, decoding and augmentation path.

    python -m resnet_flax.data.generated --data-dir /tmp/fake_tfds --train-per-class 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from resnet_flax.data.config import DataError, require_tfds

# imagenette's ten ImageNet classes (TFDS image_classification/imagenette_labels.txt).
IMAGENETTE_WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)
# tfds_config -> the folder name inside the original archive.
ARCHIVE_DIRS = {"320px-v2": "imagenette2-320", "160px-v2": "imagenette2-160"}


def write_jpegs(
    folder: Path, classes: int, per_class: dict[str, int], size: tuple[int, int], seed: int
) -> None:
    """Random-content JPEGs of roughly `size` (h, w) in <folder>/<split>/<wnid>/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for wnid in IMAGENETTE_WNIDS[:classes]:
            out = folder / split / wnid
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h = int(size[0] * rng.uniform(0.8, 1.2))
                w = int(size[1] * rng.uniform(0.8, 1.2))
                # Smooth content (a blurred random field) compresses like a photo, not like noise.
                small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
                image.save(out / f"{wnid}_{i}.JPEG", quality=90)


def build_fake_imagenette(
    data_dir: str | Path,
    train_per_class: int = 8,
    val_per_class: int = 4,
    size: tuple[int, int] = (320, 426),
    classes: int = 10,
    config: str = "320px-v2",
    seed: int = 0,
) -> Path:
    """Build imagenette/<config> into data_dir from generated JPEGs; returns data_dir."""
    import tensorflow_datasets as tfds

    if config not in ARCHIVE_DIRS:
        raise ValueError(f"config must be one of {', '.join(ARCHIVE_DIRS)}; got {config!r}")
    data_dir = Path(data_dir)
    source = data_dir / "fake_download"
    per_class = {"train": train_per_class, "val": val_per_class}
    write_jpegs(source / ARCHIVE_DIRS[config], classes, per_class, size, seed)
    with mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(source)
    ):
        tfds.builder(f"imagenette/{config}", data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: build a generated imagenette into --data-dir; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--config", default="320px-v2", choices=sorted(ARCHIVE_DIRS))
    args = p.parse_args(argv)
    try:
        require_tfds("imagenette")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    height = 320 if args.config == "320px-v2" else 160
    build_fake_imagenette(
        args.data_dir,
        args.train_per_class,
        args.val_per_class,
        size=(height, height * 4 // 3),
        config=args.config,
    )
    print(f"built imagenette/{args.config} from generated JPEGs in {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

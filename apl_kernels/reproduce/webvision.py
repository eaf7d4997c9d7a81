"""WebVision-mini (the first 50 classes of WebVision 1.0's Google images) and the same 50 classes
of the ILSVRC2012 validation set, read from the files a user already has, decoded by DataLoader
workers (docs/reproduction.md, "WebVision-mini").

Layout under the WebVision root (``--data-dir``):

* the training list, ``webvision_mini_train.txt`` if present, else WebVision's own
  ``info/train_filelist_google.txt`` filtered to labels < 50: one ``relative/path.jpg label`` per
  line, the path relative to the root (``google/q0001/000001.jpg 0``);
* ``info/val_filelist.txt`` (``val000001.jpg 0``), the images in ``val_images_256/``;
* ILSVRC2012 val in torchvision's ``ImageNet(split="val")`` folder layout, ``imagenet/val/<wnid>/*``
  under the root (or ``--imagenet-dir``): the class folders sorted by WordNet id, the first 50 kept
  (WebVision's classes 0-49 are the same concepts in the same order).

Errors are one line that names the file and the fix: a missing root, list or folder; a list line
that is not ``path label`` or names no file (every listed file is checked before training starts,
so that a missing file stops the run at once, not hours into it); an image that cannot be decoded.
An undecodable image **stops** the run (:class:`ImageUnreadable`) rather than being skipped and
counted: skipping changes the dataset silently (the published numbers used every image), and under
DDP a rank that drops a sample would leave the ranks with batches of different sizes; a damaged
file is a download to repeat, and torchrun stops every rank when one fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import DatasetNotFound

NUM_CLASSES = 50
TRAIN_LISTS = ("webvision_mini_train.txt", "info/train_filelist_google.txt")
VAL_LIST = "info/val_filelist.txt"
VAL_FOLDER = "val_images_256"
IMAGENET_VAL = "imagenet"  # under the root: imagenet/val/<wnid>/
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOCS = "docs/reproduction.md, \"WebVision-mini\""


class ImageUnreadable(RuntimeError):
    """An image of a list cannot be decoded; the message names it."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def read_list(path: Path, folder: Path, keep_below: int | None = None) -> list[Sample]:
    """The ``relative/path label`` lines of list ``path``, paths resolved under ``folder``; with
    ``keep_below``, only the lines whose label is below it. Raises :class:`DatasetNotFound` (one
    line) for a missing list, a malformed line or a line naming no file."""
    if not path.is_file():
        raise DatasetNotFound(f"WebVision list {path} not found; pass --data-dir DIR with DIR the WebVision "
                              f"root ({DOCS})")
    samples, absent = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            label = fields[-1]
            if len(fields) < 2 or not label.lstrip("-").isdigit() or int(label) < 0:
                raise DatasetNotFound(f"{path}, line {number}: {line.strip()!r} is not 'relative/path.jpg "
                                      f"LABEL' with LABEL an integer >= 0")
            if keep_below is not None and int(label) >= keep_below:
                continue
            name = folder / " ".join(fields[:-1])
            if not name.is_file():
                absent.append((number, name))
            samples.append(Sample(str(name), int(label)))
    if absent:
        number, name = absent[0]
        raise DatasetNotFound(f"{path}, line {number}: {name} does not exist ({len(absent)} of {len(samples)} "
                              f"listed files are missing); the list and the images must come from the same "
                              f"WebVision download")
    if not samples:
        raise DatasetNotFound(f"{path} lists no image" + (f" with a label below {keep_below}" if keep_below else ""))
    labels = sorted({s.label for s in samples})
    if labels[-1] >= NUM_CLASSES:
        raise DatasetNotFound(f"{path}: label {labels[-1]} is not a WebVision-mini class (0-{NUM_CLASSES - 1})")
    return samples


def train_list(root: Path) -> list[Sample]:
    """The training samples: ``webvision_mini_train.txt``, else WebVision's Google list, labels < 50."""
    check_root(root)
    mini, google = (root / name for name in TRAIN_LISTS)
    if mini.is_file():
        return read_list(mini, root)
    if google.is_file():
        return read_list(google, root, keep_below=NUM_CLASSES)
    raise DatasetNotFound(f"no WebVision training list in {root}: neither {TRAIN_LISTS[0]} nor "
                          f"{TRAIN_LISTS[1]}; pass --data-dir DIR with DIR the WebVision root ({DOCS})")


def webvision_val(root: Path) -> list[Sample]:
    """WebVision's validation images of the 50 classes (``info/val_filelist.txt``)."""
    check_root(root)
    folder = root / VAL_FOLDER
    if not folder.is_dir():
        raise DatasetNotFound(f"{folder} not found: WebVision's validation images (val_images_256.tar) "
                              f"extracted in the root ({DOCS})")
    return read_list(root / VAL_LIST, folder, keep_below=NUM_CLASSES)


def imagenet_val(folder: Path) -> list[Sample]:
    """ILSVRC2012 val in torchvision's folder layout (``folder/val/<wnid>/``), the first 50 WordNet ids."""
    val = folder / "val"
    if not val.is_dir():
        raise DatasetNotFound(f"ImageNet validation folder {val} not found: torchvision's ImageNet(split='val') "
                              f"layout, one folder per WordNet id, is read from --imagenet-dir "
                              f"(default DATA_DIR/{IMAGENET_VAL}) ({DOCS})")
    wnids = sorted(entry.name for entry in os.scandir(val) if entry.is_dir())
    if len(wnids) < NUM_CLASSES:
        raise DatasetNotFound(f"{val} has {len(wnids)} class folders; the 50 classes of WebVision-mini are the "
                              f"first 50 of ILSVRC2012's 1000 WordNet ids, so all 1000 (or at least the first "
                              f"50: n01440764 to n01632777) are expected")
    samples = [Sample(str(val / wnid / name), label) for label, wnid in enumerate(wnids[:NUM_CLASSES])
               for name in sorted(os.listdir(val / wnid)) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not samples:
        raise DatasetNotFound(f"{val}: the first 50 class folders hold no image")
    return samples


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetNotFound(f"WebVision root {root} not found; pass --data-dir DIR with DIR the folder that "
                              f"holds info/ and the images ({DOCS})")


def transforms(train: bool, image_size: int = 224, augment: bool = True):
    """The published transforms (ANL's ``dataset.py``): train RandomResizedCrop(224), horizontal
    flip, ColorJitter(0.4, 0.4, 0.4, 0.2); test Resize(256), CenterCrop(224); both ToTensor and
    ImageNet's normalization. ``image_size`` scales 224 (and 256 with it) for tests;
    ``augment=False`` gives the test transform for training too (deterministic: tests only)."""
    from torchvision import transforms as T

    resize = round(image_size * 256 / 224)
    if train and augment:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    else:
        steps = [T.Resize(resize), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageList(Dataset):
    """(image tensor, label) of a list of samples, decoded with PIL in the DataLoader's workers."""

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        sample = self.samples[index]
        try:
            with Image.open(sample.path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a truncated or foreign file
            raise ImageUnreadable(f"{sample.path}: not a decodable image ({err}); download it again or remove "
                                  f"its line from the list") from None
        return self.transform(rgb), sample.label


@dataclass
class WebVisionData:
    """The three sets of a WebVision-mini run."""

    train: ImageList
    val_sets: dict[str, ImageList]  # "webvision", "imagenet"
    num_classes: int = NUM_CLASSES


def load(root: str | Path, imagenet_dir: str | Path | None = None, image_size: int = 224,
         augment: bool = True) -> WebVisionData:
    """The training list and both validation sets, every listed file checked to exist."""
    root = Path(root)
    imagenet = Path(imagenet_dir) if imagenet_dir else root / IMAGENET_VAL
    test = transforms(False, image_size)
    return WebVisionData(ImageList(train_list(root), transforms(True, image_size, augment)),
                         {"webvision": ImageList(webvision_val(root), test),
                          "imagenet": ImageList(imagenet_val(imagenet), test)})


def missing(root: str | Path, imagenet_dir: str | Path | None = None) -> str | None:
    """Why the data cannot be read (one line), or ``None``: the roots, lists and folders only."""
    root = Path(root)
    imagenet = Path(imagenet_dir) if imagenet_dir else root / IMAGENET_VAL
    if not root.is_dir():
        return f"WebVision root {root} not found; pass --data-dir DIR with DIR the folder that holds info/ ({DOCS})"
    if not any((root / name).is_file() for name in TRAIN_LISTS):
        return f"no WebVision training list in {root}: neither {TRAIN_LISTS[0]} nor {TRAIN_LISTS[1]} ({DOCS})"
    for path in (root / VAL_LIST, root / VAL_FOLDER, imagenet / "val"):
        if not path.exists():
            return f"{path} not found ({DOCS})"
    return None

"""Datasets on the training device, and augmentation of whole batches with tensor operations.

CIFAR-10, CIFAR-100 and MNIST are read from ``data_dir`` in torchvision's on-disk layout
(``cifar-10-batches-py/``, ``cifar-100-python/``, ``MNIST/raw/``); ``download=True`` fetches them
through torchvision. ``digits`` is scikit-learn's bundled 8x8 digits, available offline. The human labels of CIFAR-10N
and CIFAR-100N are read from the authors' files in ``data_dir`` (:data:`HUMAN_FILES`).

The whole training set is one ``uint8`` tensor ``(N, C, H, W)`` on the training device.
:class:`BatchAugment` turns a batch of it into the normalized float input of the network with
a handful of tensor operations (one gather does random crop and flip for the whole batch), so
no per-image PIL work and no DataLoader worker can starve a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    """What the spec fixes per dataset: classes, image shape, augmentation, normalization."""

    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None  # None: the training images' own mean and std
    std: tuple[float, ...] | None
    train_size: int  # images of the full dataset (for cost estimates before loading it)
    test_size: int
    crop_padding: int = 0  # random crop of the original size after zero padding; 0: no crop
    flip: bool = False  # random horizontal flip with probability 1/2
    rotation_degrees: float = 0.0  # random rotation in [-d, d], nearest, zero fill; 0: none


DATASETS = {
    "cifar10": DatasetInfo("CIFAR-10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), 50_000, 10_000, crop_padding=4, flip=True),
    "cifar100": DatasetInfo("CIFAR-100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), 50_000, 10_000, crop_padding=4, flip=True, rotation_degrees=20.0),
    "mnist": DatasetInfo("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), 60_000, 10_000),
    "digits": DatasetInfo("scikit-learn digits", 10, (1, 8, 8), None, None, 1_437, 360),
}

# The human label files of CIFAR-N (Wei et al., ICLR 2022), as the authors distribute them
# (https://github.com/UCSC-REAL/cifar-10-100n, folder data/): a torch.save'd dict of label arrays
# in the order of torchvision's training set, "clean_label" and one key per label set
# (noise.HUMAN_LABEL_SETS).
HUMAN_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
HUMAN_URL = "https://github.com/UCSC-REAL/cifar-10-100n (folder data/)"
DOCS = "docs/reproduction.md, \"Getting the data\""
MNIST_FILES = [f"{prefix}-{kind}-idx{dims}-ubyte" for prefix in ("train", "t10k")
               for kind, dims in (("images", 3), ("labels", 1))]

DIGITS_TEST_FRACTION = 0.2  # digits has no official split: a fixed stratified 80/20 split
DIGITS_SPLIT_SEED = 0


class DatasetNotFound(FileNotFoundError):
    """A dataset is not in ``data_dir``, or a file of it cannot be read; the message (one line) names
    the file or where it was looked for, and says what to do."""


@dataclass
class Data:
    """A dataset on one device: uint8 images ``(N, C, H, W)``, int64 clean labels."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    human_labels: dict[str, np.ndarray] = field(default_factory=dict)  # CIFAR-N label sets

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.name]

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


def check_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def numpy_globals() -> dict[str, object]:
    """The numpy names a pickled array refers to, under numpy 1's module names (``numpy.core``: the
    official CIFAR batches, the CIFAR-N files) and numpy 2's (``numpy._core``): ``_reconstruct``
    (pickle protocols 0 to 4), ``_frombuffer`` (protocol 5), the array and dtype types."""
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    names = {f"{core}.{module}.{function.__name__}": function for core in ("numpy.core", "numpy._core")
             for module, function in (("multiarray", _reconstruct), ("numeric", _frombuffer))}
    dtype_classes = {type(np.dtype(code)) for code in "bBhHiIlLqQefd?"}  # numpy.dtypes.Int64DType, ...
    return names | {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype} | {
        f"{cls.__module__}.{cls.__qualname__}": cls for cls in dtype_classes}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocols 0 to 2 of Python 3 use it for ``bytes``, and nothing more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a saved bytes object")
    return text.encode("latin1")


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds what a CIFAR batch holds (dicts, lists, str, bytes, ints, numpy
    arrays and their dtypes) and refuses every other name a pickle refers to: a pickle names the
    functions that unpickling it calls (``os.system``...), so reading an arbitrary one runs code."""

    allowed = {**numpy_globals(), "_codecs.encode": _latin1_encode}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds, "
                                         f"and is refused unread, as unpickling it could run code") from None


def published_md5(name: str) -> dict[str, str]:
    """The MD5 of each official file of CIFAR ``name``, as torchvision publishes them."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    return dict(dataset_class.train_list + dataset_class.test_list)


def _read_batch(path: Path, label_key: str, title: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows ``(N, 3072)`` uint8, labels ``(N,)`` int64 and the MD5 of CIFAR batch ``path``;
    :class:`DatasetNotFound`, one line naming the file, if it is not a CIFAR batch."""
    try:
        content = path.read_bytes()
        batch = BatchUnpickler(io.BytesIO(content), encoding="latin1").load()
        if not isinstance(batch, dict):
            raise ValueError(f"a dict was expected, found {type(batch).__name__}")
        data, labels = batch["data"], np.asarray(batch[label_key])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise ValueError(f"'data' must be a uint8 array of 3072 pixels per row, found "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        if labels.dtype.kind not in "iu" or labels.shape != data.shape[:1]:
            raise ValueError(f"{label_key!r} must be {data.shape[0]} integers, found {labels.dtype} {labels.shape}")
    except KeyError as err:
        reason = f"no key {err}"
    except Exception as err:  # whatever a damaged file makes reading it raise: truncated, wrong types
        reason = _first_line(err)
    else:
        return data, labels.astype(np.int64), hashlib.md5(content, usedforsecurity=False).hexdigest()
    raise DatasetNotFound(f"{path} is not a readable {title} batch ({reason}); download {title} again "
                          f"(--download into an empty --data-dir; {DOCS})")


def _read_cifar(title: str, folder: Path, files: list[str], label_key: str):
    """Images ``(N, 3, 32, 32)`` uint8 and labels of torchvision's CIFAR pickles ``files``, and the
    MD5 of each file."""
    batches = [_read_batch(folder / file, label_key, title) for file in files]
    images = np.concatenate([data for data, _, _ in batches])
    labels = np.concatenate([labels for _, labels, _ in batches])
    return images.reshape(-1, 3, 32, 32), labels, {file: md5 for file, (*_, md5) in zip(files, batches)}


CIFAR_LAYOUT = {  # folder, training files, test files, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def missing(name: str, data_dir: str | Path = "data", human: bool = False, download: bool = False) -> str | None:
    """Why dataset ``name`` (and its CIFAR-N labels if ``human``) cannot be read from ``data_dir``,
    in one line that says what to do; ``None`` when its files are there. ``download``: only what
    ``--download`` cannot fetch (CIFAR-N's label files)."""
    check_dataset(name)
    data_dir = Path(data_dir)
    if download:
        pass
    elif name in CIFAR_LAYOUT:
        folder_name, train_files, test_files, _ = CIFAR_LAYOUT[name]
        folder = data_dir / folder_name
        absent = [f for f in train_files + test_files if not (folder / f).is_file()]
        if absent:
            return (f"{DATASETS[name].title} not found: {folder} lacks {', '.join(absent)}; pass --data-dir "
                    f"DIR where DIR/{folder_name}/ is torchvision's extracted archive, or add --download "
                    f"({DOCS})")
    elif name == "mnist":
        raw = data_dir / "MNIST" / "raw"
        absent = [f for f in MNIST_FILES if not (raw / f).is_file()]
        if absent:
            return (f"MNIST not found: {raw} lacks {', '.join(absent)}; pass --data-dir DIR holding "
                    f"torchvision's MNIST/raw/ files, or add --download ({DOCS})")
    if human:
        if name not in HUMAN_FILES:
            return f"human label noise exists for CIFAR-10 and CIFAR-100 (CIFAR-N), not {DATASETS[name].title}"
        if not (data_dir / HUMAN_FILES[name]).is_file():
            return (f"{HUMAN_FILES[name]} not found in {data_dir}: download it from {HUMAN_URL} into "
                    f"--data-dir (it cannot be downloaded by --download; {DOCS})")
    return None


def _download(name: str, fetch) -> None:
    """Run torchvision's ``fetch()``; a failed download is one :class:`DatasetNotFound` line."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints a line per failed mirror
            fetch()
    except (OSError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:160]
        raise DatasetNotFound(
            f"could not download {DATASETS[name].title} ({reason}); without network access, fetch it on "
            f"another machine and pass --data-dir ({DOCS})"
        ) from None


def _load_cifar(name: str, data_dir: Path, download: bool):
    folder_name, train_files, test_files, label_key = CIFAR_LAYOUT[name]
    folder = data_dir / folder_name
    if download and missing(name, data_dir):
        from torchvision import datasets

        dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        _download(name, lambda: dataset_class(str(data_dir), train=True, download=True))  # fetch, verify, extract
    problem = missing(name, data_dir)
    if problem:
        raise DatasetNotFound(problem)
    title = DATASETS[name].title
    *train, train_md5 = _read_cifar(title, folder, train_files, label_key)
    *test, test_md5 = _read_cifar(title, folder, test_files, label_key)
    published = published_md5(name)
    altered = [file for file, md5 in (train_md5 | test_md5).items() if published.get(file) != md5]
    if altered:  # valid batches, not the official ones: used, with a warning
        from .store import warn

        warn(f"{folder}: {', '.join(altered)} {'differs' if len(altered) == 1 else 'differ'} from the published "
             f"{title} files (MD5); they hold valid batches and are used, but results from them are not "
             f"comparable with the paper's")
    return (*train, *test)


def _load_mnist(data_dir: Path, download: bool):
    """MNIST's IDX files in ``data_dir/MNIST/raw``, read by torchvision's IDX reader (not through
    ``datasets.MNIST``, which prefers a legacy ``processed/*.pt`` file beside them if there is one)."""
    from torchvision import datasets
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if download and missing("mnist", data_dir):
        _download("mnist", lambda: datasets.MNIST(str(data_dir), train=True, download=True))
    problem = missing("mnist", data_dir)
    if problem:
        raise DatasetNotFound(problem)
    arrays = []
    for name in MNIST_FILES:  # train images, train labels, test images, test labels
        path = data_dir / "MNIST" / "raw" / name
        try:
            array = (read_image_file if "images" in name else read_label_file)(str(path)).numpy()
        except Exception as err:  # truncated, not an IDX file, wrong type or dimensions
            raise DatasetNotFound(f"{path} is not a readable MNIST file ({_first_line(err)}); download MNIST "
                                  f"again (--download into an empty --data-dir; {DOCS})") from None
        arrays.append(array[:, None] if "images" in name else array.astype(np.int64))
    return tuple(arrays)


def load_human_labels(name: str, data_dir: str | Path, clean_train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The CIFAR-N label sets of ``name`` (noise.HUMAN_LABEL_SETS), checked against the training
    labels: the file's ``clean_label`` must equal them, position by position."""
    from .noise import HUMAN_LABEL_SETS

    problem = missing(name, data_dir, human=True)
    if problem:
        raise DatasetNotFound(problem)
    path = Path(data_dir) / HUMAN_FILES[name]
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in numpy_globals().items()]):
            content = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(content, dict):
            raise ValueError(f"a dict of label arrays was expected, found {type(content).__name__}")
        labels = {key: np.asarray(content[key]).astype(np.int64).reshape(-1)
                  for key in ("clean_label", *HUMAN_LABEL_SETS[name].values())}
    except KeyError as err:
        raise DatasetNotFound(f"{path} has no key {err}: it is not the CIFAR-N file of {DATASETS[name].title}; "
                              f"get it from {HUMAN_URL}") from None
    except Exception as err:  # truncated, not a torch file, not arrays
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DatasetNotFound(f"{path} cannot be read ({reason}); download it again from {HUMAN_URL}") from None
    clean = labels.pop("clean_label")
    differ = np.flatnonzero(clean != clean_train_labels) if clean.shape == clean_train_labels.shape else None
    if differ is None or differ.size:
        where = (f"{clean.size} labels for {clean_train_labels.size} training images" if differ is None else
                 f"{differ.size} of {clean.size} labels differ, the first at index {differ[0]}")
        raise DatasetNotFound(
            f"{path}: its clean_label does not match the {DATASETS[name].title} training labels ({where}); "
            f"the file must be in the order of torchvision's training set; get the official file from {HUMAN_URL}"
        )
    return {label_set: labels[key] for label_set, key in HUMAN_LABEL_SETS[name].items()}


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16: scale to the 0..255 of every other dataset here.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return train_x, train_y, test_x, test_y


def load_arrays(name: str, data_dir: str | Path = "data", download: bool = False):
    """``(train_images, train_labels, test_images, test_labels)`` as numpy (uint8 NCHW, int64)."""
    check_dataset(name)
    if name == "digits":
        return _load_digits()
    data_dir = Path(data_dir)
    if name == "mnist":
        return _load_mnist(data_dir, download)
    return _load_cifar(name, data_dir, download)


def load(name: str, device: str | torch.device = "cpu", data_dir: str | Path = "data",
         download: bool = False, human: bool = False) -> Data:
    """Dataset ``name`` as uint8 tensors on ``device``, with the normalization of the spec; with
    ``human``, also its CIFAR-N human label sets (``Data.human_labels``)."""
    info = check_dataset(name)
    train_x, train_y, test_x, test_y = load_arrays(name, data_dir, download)
    if tuple(train_x.shape[1:]) != info.image_shape or tuple(test_x.shape[1:]) != info.image_shape:
        raise ValueError(
            f"{info.title} images must have shape {info.image_shape}; got {train_x.shape[1:]} "
            f"(train) and {test_x.shape[1:]} (test)"
        )
    bad = [int(y) for y in (train_y.min(), train_y.max(), test_y.min(), test_y.max())
           if not 0 <= y < info.num_classes]
    if bad:
        raise ValueError(f"{info.title} labels must lie in [0, {info.num_classes}); found {bad[0]}")
    if info.mean is None:  # per-channel statistics of the training images
        pixels = train_x.astype(np.float64).transpose(1, 0, 2, 3).reshape(train_x.shape[1], -1) / 255.0
        mean, std = tuple(pixels.mean(axis=1).tolist()), tuple(pixels.std(axis=1).tolist())
    else:
        mean, std = info.mean, info.std

    def as_tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    human_labels = load_human_labels(name, data_dir, train_y) if human else {}
    return Data(name, as_tensor(train_x), as_tensor(train_y), as_tensor(test_x), as_tensor(test_y),
                mean, std, human_labels)


class BatchAugment:
    """uint8 batches ``(B, C, H, W)`` -> normalized float32, augmented as the dataset's spec says.

    The published PIL pipeline, on whole batches: zero padding + random crop (torchvision's
    ``RandomCrop(size, padding)``), horizontal flip with probability 1/2, rotation by an angle
    uniform in ``[-d, d]`` with nearest sampling and zero fill (``RandomRotation(d)``), then
    ``ToTensor`` + ``Normalize``. Random numbers come from the caller's generator only.
    """

    def __init__(self, info: DatasetInfo, mean, std, device: str | torch.device) -> None:
        self.info = info
        channels = len(mean)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale - shift, in one fused multiply-add per pixel
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = mean_t / std_t

    @property
    def augments(self) -> bool:
        info = self.info
        return bool(info.crop_padding or info.flip or info.rotation_degrees)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or float pixels in 0..255 -> the network's normalized float32 input."""
        return torch.addcmul(-self.shift, images.float(), self.scale)

    def crop_and_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Random crop after zero padding and random horizontal flip: one gather for the batch."""
        batch, channels, height, width = images.shape
        pad = self.info.crop_padding
        device = images.device
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        padded_width = width + 2 * pad
        top = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device)
        left = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device)
        rows = top + torch.arange(height, device=device)  # (B, H)
        cols = left + torch.arange(width, device=device)  # (B, W)
        if self.info.flip:
            flipped = torch.rand((batch, 1), generator=generator, device=device) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
        pixels = padded.reshape(batch, channels, -1).gather(2, index.expand(batch, channels, -1))
        return pixels.view(batch, channels, height, width)

    @staticmethod
    def rotate(images: Tensor, degrees: Tensor) -> Tensor:
        """Float ``images`` rotated about their centre by ``degrees`` (one per image; positive:
        counter-clockwise); nearest pixel, zero fill."""
        radians = degrees.to(images.dtype) * (math.pi / 180.0)
        cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augmented, normalized float32 batch of the uint8 ``images``."""
        if self.info.crop_padding or self.info.flip:
            images = self.crop_and_flip(images, generator)
        pixels = images.float()
        if self.info.rotation_degrees:
            uniform = torch.rand(pixels.shape[0], generator=generator, device=pixels.device)
            pixels = self.rotate(pixels, (uniform * 2 - 1) * self.info.rotation_degrees)
        return self.normalize(pixels)

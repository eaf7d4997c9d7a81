"""Label noise of the APL paper's experiments (docs/reproduction.md, "Label noise").

Every function takes the clean training labels (a 1-D integer numpy array), the noise rate and a
seeded ``numpy.random.Generator``, never changes its input, and returns :class:`NoisyLabels`:
the noisy labels and the realized ``K x K`` transition matrix (row = clean class, column = noisy
class, each row the fractions of that class's samples). Test labels are never passed here.

* ``sym`` (the paper's symmetric noise): exactly ``int(rate * N / K)`` samples of every class,
  drawn without replacement, each relabelled uniformly among the *other* ``K - 1`` classes;
* ``uniform``: the same samples, relabelled uniformly among *all* ``K`` classes (so about
  ``rate * (K - 1) / K`` of the labels end up wrong);
* ``asym``, per dataset: CIFAR-10 ``sequential`` (the published code's) or ``simultaneous``,
  MNIST's (also used for ``digits``) and CIFAR-100's;
* ``human``: the human annotations of CIFAR-10N / CIFAR-100N (Wei et al., ICLR 2022), one of the
  label sets of :data:`HUMAN_LABEL_SETS` (its name stands where a rate stands for the others);
  datasets.py reads them from the authors' files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# CIFAR-10 asymmetric flips (source class -> target class), in the published code's order:
# truck -> automobile, bird -> airplane, cat -> dog, dog -> cat, deer -> horse.
CIFAR10_FLIPS = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))
# MNIST asymmetric flips: 7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8.
MNIST_FLIPS = ((7, 1), (2, 7), (5, 6), (6, 5), (3, 8))
CIFAR100_BLOCK = 5

# Noise kinds of a reproduction grid ("--noise KIND:RATES"), and what each means.
NOISE_KINDS = {
    "sym": "symmetric: exactly int(rate*N/K) labels per class moved to another class",
    "uniform": "uniform: exactly int(rate*N/K) labels per class redrawn among all K classes",
    "asym": "the dataset's asymmetric noise (CIFAR-10: the published sequential flips)",
    "asym-sim": "CIFAR-10 asymmetric noise with every flip drawn from the clean labels",
    "human": "CIFAR-10N / CIFAR-100N human labels: human:aggre,worse,random1,random2,random3 "
             "(CIFAR-10) or human:noisy (CIFAR-100)",
}

# The human label sets of CIFAR-N: name -> key of the authors' label file (datasets.HUMAN_FILES).
HUMAN_LABEL_SETS = {
    "cifar10": {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
                "random2": "random_label2", "random3": "random_label3"},
    "cifar100": {"noisy": "noisy_label"},
}


def cell_name(kind: str, rate: float | str) -> str:
    """A noise cell in file names: ``sym0.4``, ``asym0.2``, ``human-aggre``."""
    return f"{kind}-{rate}" if kind == "human" else f"{kind}{float(rate)}"


def cell_label(kind: str, rate: float | str) -> str:
    """A noise cell in tables and plots: ``sym 0.4``, ``clean``, ``human aggre``."""
    if isinstance(rate, str):
        return f"{kind} {rate}"
    return "clean" if rate == 0.0 else f"{kind} {rate:g}"


@dataclass
class NoisyLabels:
    labels: np.ndarray  # int64 (N,), the noisy training labels
    transition: np.ndarray  # float64 (K, K): [clean class, noisy class] fraction of that class
    changed: np.ndarray  # bool (N,), where the noisy label differs from the clean one

    @property
    def rate(self) -> float:
        """The realized fraction of labels that differ from the clean ones."""
        return float(self.changed.mean()) if self.changed.size else 0.0


def _check(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"the noise rate must be a number in [0, 1], got {rate!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Realized ``K x K`` matrix: row ``i`` holds where the samples of clean class ``i`` went."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (clean, noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _result(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> NoisyLabels:
    return NoisyLabels(noisy, transition_matrix(clean, noisy, num_classes), noisy != clean)


def _per_class_draw(clean: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator):
    """Indices of exactly ``int(rate * N / K)`` samples of every class, without replacement."""
    per_class = int(rate * clean.size / num_classes)
    chosen = []
    for k in range(num_classes):
        members = np.flatnonzero(clean == k)
        if per_class > members.size:
            raise ValueError(
                f"noise rate {rate} asks for {per_class} noisy labels per class but class {k} has "
                f"only {members.size} samples; use a lower rate"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def symmetric(labels, rate: float, num_classes: int, rng: np.random.Generator) -> NoisyLabels:
    """The paper's symmetric noise: chosen labels move uniformly to one of the other K - 1 classes."""
    clean = _check(labels, rate, num_classes)
    noisy = clean.copy()
    chosen = _per_class_draw(clean, rate, num_classes, rng)
    # Adding 1..K-1 modulo K reaches every other class with equal probability, never the same one.
    noisy[chosen] = (clean[chosen] + rng.integers(1, num_classes, chosen.size)) % num_classes
    return _result(clean, noisy, num_classes)


def uniform(labels, rate: float, num_classes: int, rng: np.random.Generator) -> NoisyLabels:
    """Chosen labels are redrawn uniformly among all K classes (some keep their clean label)."""
    clean = _check(labels, rate, num_classes)
    noisy = clean.copy()
    chosen = _per_class_draw(clean, rate, num_classes, rng)
    noisy[chosen] = rng.integers(0, num_classes, chosen.size)
    return _result(clean, noisy, num_classes)


def cifar10_asymmetric(labels, rate: float, rng: np.random.Generator, mode: str = "sequential") -> NoisyLabels:
    """CIFAR-10's class flips, each moving exactly ``int(rate * |source class|)`` samples.

    ``sequential`` (the published code): the flips run in :data:`CIFAR10_FLIPS` order on the labels
    as already changed, so dog -> cat also draws from the cats just flipped to dog (realized cat
    noise about ``rate * (1 - rate)``). ``simultaneous``: every flip draws from the clean labels.
    """
    if mode not in ("sequential", "simultaneous"):
        raise ValueError(f"CIFAR-10 asymmetric mode must be 'sequential' or 'simultaneous', got {mode!r}")
    clean = _check(labels, rate, 10)
    noisy = clean.copy()
    for source, target in CIFAR10_FLIPS:
        drawn_from = noisy if mode == "sequential" else clean
        members = np.flatnonzero(drawn_from == source)
        flipped = rng.choice(members, int(rate * members.size), replace=False)
        noisy[flipped] = target
    return _result(clean, noisy, 10)


def _flip_with_probability(clean: np.ndarray, rate: float, mapping: np.ndarray, rng) -> np.ndarray:
    """Each sample moves to ``mapping[label]`` with probability ``rate`` (if that is another class)."""
    noisy = clean.copy()
    flip = rng.random(clean.size) < rate
    noisy[flip] = mapping[clean[flip]]
    return noisy


def mnist_asymmetric(labels, rate: float, rng: np.random.Generator) -> NoisyLabels:
    """MNIST's flips 7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8, each sample with probability ``rate``."""
    clean = _check(labels, rate, 10)
    mapping = np.arange(10)
    for source, target in MNIST_FLIPS:
        mapping[source] = target
    return _result(clean, _flip_with_probability(clean, rate, mapping, rng), 10)


def cifar100_asymmetric(labels, rate: float, rng: np.random.Generator) -> NoisyLabels:
    """Within blocks of 5 consecutive classes, ``i -> i + 1`` (the block's last -> its first)."""
    clean = _check(labels, rate, 100)
    classes = np.arange(100)
    mapping = classes - classes % CIFAR100_BLOCK + (classes + 1) % CIFAR100_BLOCK
    return _result(clean, _flip_with_probability(clean, rate, mapping, rng), 100)


# Which asymmetric noise each dataset uses.
ASYMMETRIC = {
    "cifar10": lambda labels, rate, rng: cifar10_asymmetric(labels, rate, rng, "sequential"),
    "mnist": mnist_asymmetric,
    "digits": mnist_asymmetric,
    "cifar100": cifar100_asymmetric,
}


def given_labels(labels, noisy_labels, num_classes: int) -> NoisyLabels:
    """Noise that someone else drew (CIFAR-N's human labels): ``noisy_labels`` for ``labels``."""
    clean = _check(labels, 0.0, num_classes)
    noisy = _check(noisy_labels, 0.0, num_classes)
    if noisy.shape != clean.shape:
        raise ValueError(f"{noisy.size} noisy labels for {clean.size} samples")
    return _result(clean, noisy, num_classes)


def make_noisy_labels(dataset: str, kind: str, rate: float | str, labels, num_classes: int, seed: int,
                      human_labels: dict | None = None) -> NoisyLabels:
    """Noisy training labels for a grid cell: noise ``kind`` (:data:`NOISE_KINDS`) at ``rate``.

    Deterministic in ``seed``. For ``human`` noise ``rate`` names the label set and
    ``human_labels`` maps label set names to the noisy labels (``datasets.Data.human_labels``).
    """
    if kind == "human":
        if not human_labels or rate not in human_labels:
            raise ValueError(f"human label set {rate!r} of {dataset} is not loaded; available: "
                             f"{', '.join(human_labels or {}) or 'none'}")
        return given_labels(labels, human_labels[rate], num_classes)
    rng = np.random.default_rng(seed)
    if kind == "sym":
        return symmetric(labels, rate, num_classes, rng)
    if kind == "uniform":
        return uniform(labels, rate, num_classes, rng)
    if kind == "asym":
        if dataset not in ASYMMETRIC:
            raise ValueError(f"no asymmetric noise is defined for dataset {dataset!r}")
        return ASYMMETRIC[dataset](labels, rate, rng)
    if kind == "asym-sim":
        if dataset != "cifar10":
            raise ValueError(f"noise 'asym-sim' is CIFAR-10's simultaneous flips; dataset is {dataset!r}")
        return cifar10_asymmetric(labels, rate, rng, "simultaneous")
    raise ValueError(f"unknown noise kind {kind!r}; available: {', '.join(NOISE_KINDS)}")

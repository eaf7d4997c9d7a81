"""Label noise: realized rates and per-class counts exactly as docs/reproduction.md says."""

import numpy as np
import pytest

from apl_kernels.reproduce import noise


def balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """``sigmas`` standard deviations of the fraction of ``n`` Bernoulli(p) trials."""
    return sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6, 0.8])
def test_symmetric_moves_exactly_int_rate_n_over_k_per_class_to_other_classes(rate, seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 500, rng)
    result = noise.symmetric(clean, rate, 10, rng)
    expected_per_class = int(rate * clean.size / 10)
    for k in range(10):
        assert int(result.changed[clean == k].sum()) == expected_per_class
    assert np.array_equal(result.changed, result.labels != clean)  # never kept its true label
    assert result.rate == pytest.approx(10 * expected_per_class / clean.size)
    assert np.allclose(np.diag(result.transition), 1 - expected_per_class / 500)
    assert np.allclose(result.transition.sum(axis=1), 1.0)


def test_symmetric_spreads_uniformly_over_the_other_classes(seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 2000, rng)
    result = noise.symmetric(clean, 0.9, 10, rng)
    off_diagonal = result.transition[~np.eye(10, dtype=bool)]
    # each of the 9 other classes gets 1/9 of the 1800 moved labels of a class
    assert np.abs(off_diagonal - 0.9 / 9).max() < 0.9 * binomial_bound(1800, 1 / 9)


def test_symmetric_counts_are_per_class_on_unbalanced_data(seed):
    rng = np.random.default_rng(seed)
    sizes = [50, 80, 120, 200]
    clean = rng.permutation(np.repeat(np.arange(4), sizes))
    result = noise.symmetric(clean, 0.4, 4, rng)
    per_class = int(0.4 * clean.size / 4)
    assert [int(result.changed[clean == k].sum()) for k in range(4)] == [per_class] * 4
    with pytest.raises(ValueError, match="class 0 has only 50 samples"):
        noise.symmetric(clean, 0.5, 4, rng)


def test_uniform_redraws_among_all_classes(seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 2000, rng)
    result = noise.uniform(clean, 0.6, 10, rng)
    per_class = int(0.6 * clean.size / 10)
    changed_per_class = np.array([result.changed[clean == k].sum() for k in range(10)])
    assert (changed_per_class <= per_class).all()
    # a redrawn label keeps its class with probability 1/K, so about rate*(K-1)/K end up wrong
    redrawn = 10 * per_class
    kept = redrawn - changed_per_class.sum()
    assert abs(kept / redrawn - 0.1) < binomial_bound(redrawn, 0.1)
    assert abs(result.rate - 0.6 * 0.9) < binomial_bound(redrawn, 0.1) * redrawn / clean.size


def expected_sequential_cat_noise(rate: float, per_class: int = 5000) -> float:
    """Cats flipped to dog minus those flipped back by dog -> cat, which draws from dogs and them."""
    cats_to_dog = int(rate * per_class)
    dog_labelled = per_class + cats_to_dog
    flipped_back = int(rate * dog_labelled) * cats_to_dog / dog_labelled
    return (cats_to_dog - flipped_back) / per_class


SPEC_SEQUENTIAL_CAT_NOISE = {0.1: 0.091, 0.2: 0.158, 0.3: 0.214, 0.4: 0.244}


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4])
def test_cifar10_sequential_gives_the_published_cat_noise_in_expectation(rate, seed):
    clean = np.repeat(np.arange(10), 5000)
    draws = 200
    cat_noise = [1 - noise.cifar10_asymmetric(clean, rate, np.random.default_rng(seed + i)).transition[3, 3]
                 for i in range(draws)]
    mean, standard_error = np.mean(cat_noise), np.std(cat_noise) / np.sqrt(draws)
    assert abs(mean - expected_sequential_cat_noise(rate)) < 5 * standard_error + 1e-9
    # The spec's values (one realization each) agree to their second decimal.
    assert abs(mean - SPEC_SEQUENTIAL_CAT_NOISE[rate]) < 0.005
    # truck, bird and deer flip exactly int(rate * 5000), each to its target only
    result = noise.cifar10_asymmetric(clean, rate, np.random.default_rng(seed))
    for source, target in [(9, 1), (2, 0), (4, 7)]:
        assert result.transition[source, target] == int(rate * 5000) / 5000
        assert result.transition[source, source] == 1 - int(rate * 5000) / 5000
    untouched = [0, 1, 6, 8]
    assert np.array_equal(result.transition[untouched][:, untouched], np.eye(4))


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_cifar10_simultaneous_flips_exactly_rate_of_each_source_class(rate, seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 1000, rng)
    result = noise.cifar10_asymmetric(clean, rate, rng, mode="simultaneous")
    expected = np.eye(10)
    for source, target in noise.CIFAR10_FLIPS:
        expected[source, source] = 1 - int(rate * 1000) / 1000
        expected[source, target] = int(rate * 1000) / 1000
    assert np.array_equal(result.transition, expected)
    assert result.rate == pytest.approx(5 * int(rate * 1000) / clean.size)


def test_mnist_asymmetric_flips_each_sample_with_probability_rate(seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 4000, rng)
    rate = 0.3
    result = noise.mnist_asymmetric(clean, rate, rng)
    flips = dict(noise.MNIST_FLIPS)
    assert flips == {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    for k in range(10):
        row = result.transition[k]
        if k in flips:
            assert abs(row[flips[k]] - rate) < binomial_bound(4000, rate)
            assert row[k] + row[flips[k]] == pytest.approx(1.0)
        else:
            assert row[k] == 1.0


def test_cifar100_asymmetric_moves_to_the_next_class_of_the_block(seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(100, 500, rng)
    rate = 0.4
    result = noise.cifar100_asymmetric(clean, rate, rng)
    for k in range(100):
        successor = k + 1 if k % 5 != 4 else k - 4
        assert abs(result.transition[k, successor] - rate) < binomial_bound(500, rate)
        assert result.transition[k, k] + result.transition[k, successor] == pytest.approx(1.0)


@pytest.mark.parametrize("dataset,kind", [("cifar10", "sym"), ("cifar10", "uniform"), ("cifar10", "asym"),
                                          ("cifar10", "asym-sim"), ("digits", "asym"), ("cifar100", "asym")])
def test_same_seed_same_labels_and_the_input_is_not_modified(dataset, kind, seed):
    num_classes = 100 if dataset == "cifar100" else 10
    clean = balanced_labels(num_classes, 60, np.random.default_rng(seed))
    original = clean.copy()
    first = noise.make_noisy_labels(dataset, kind, 0.4, clean, num_classes, seed)
    again = noise.make_noisy_labels(dataset, kind, 0.4, clean, num_classes, seed)
    other = noise.make_noisy_labels(dataset, kind, 0.4, clean, num_classes, seed + 1)
    assert np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.transition, again.transition)
    assert not np.array_equal(first.labels, other.labels)
    assert np.array_equal(clean, original)


def test_zero_rate_changes_nothing(seed):
    clean = balanced_labels(10, 30, np.random.default_rng(seed))
    for kind in ("sym", "uniform", "asym", "asym-sim"):
        result = noise.make_noisy_labels("cifar10", kind, 0.0, clean, 10, seed)
        assert np.array_equal(result.labels, clean) and result.rate == 0.0


def test_bad_input_is_refused_with_a_clear_message():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match=r"noise rate must be a number in \[0, 1\]"):
        noise.symmetric(labels, 1.5, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown noise kind 'pair'"):
        noise.make_noisy_labels("cifar10", "pair", 0.2, labels, 10, 0)
    with pytest.raises(ValueError, match="CIFAR-10's simultaneous"):
        noise.make_noisy_labels("mnist", "asym-sim", 0.2, labels, 10, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        noise.symmetric(labels, 0.2, 5, np.random.default_rng(0))


def test_human_labels_are_taken_as_given_and_measured(seed):
    rng = np.random.default_rng(seed)
    clean = balanced_labels(10, 50, rng)
    noisy = np.where(rng.random(clean.size) < 0.3, rng.integers(0, 10, clean.size), clean)
    result = noise.make_noisy_labels("cifar10", "human", "worse", clean, 10, seed, {"worse": noisy})
    assert np.array_equal(result.labels, noisy) and result.rate == pytest.approx(np.mean(noisy != clean))
    for k in range(10):
        members = clean == k
        assert np.allclose(result.transition[k], np.bincount(noisy[members], minlength=10) / members.sum())
    with pytest.raises(ValueError, match="human label set 'aggre' of cifar10 is not loaded; available: worse"):
        noise.make_noisy_labels("cifar10", "human", "aggre", clean, 10, seed, {"worse": noisy})
    with pytest.raises(ValueError, match="499 noisy labels for 500 samples"):
        noise.given_labels(clean, noisy[:-1], 10)
    assert noise.cell_name("human", "worse") == "human-worse" and noise.cell_name("sym", 0.4) == "sym0.4"

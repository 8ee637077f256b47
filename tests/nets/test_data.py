"""Datasets: digits, synthetic, loaders and augmentation."""

from __future__ import annotations

import pytest
import torch

from nets.data import ArrayDataset, available_datasets, load_dataset, make_loader
from nets.data.augment import RandomCropFlip, random_crop, random_horizontal_flip


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_split_and_normalisation(digits):
    assert available_datasets() == ["CIFAR10", "CIFAR100", "digits", "synthetic", "text"]
    assert (digits.num_classes, digits.input_shape, digits.in_channels, digits.input_size) == (
        10,
        (1, 8, 8),
        1,
        8,
    )
    assert len(digits.train) + len(digits.test) == 1797
    x, y = digits.train.get_batch(range(len(digits.train)))
    assert x.dtype == torch.float32 and x.shape == (len(digits.train), 1, 8, 8)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1.0) < 1e-3
    assert set(y.tolist()) == set(range(10))
    # the split is fixed: loading again gives the same test set
    again = load_dataset("DIGITS", seed=123)
    assert torch.equal(again.test.inputs, digits.test.inputs)
    assert digits.train_eval is digits.train  # no augmentation for digits


def test_make_loader_is_deterministic_and_seeded(digits):
    def order(seed):
        return torch.cat([y for _, y in make_loader(digits.train, 100, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    before = torch.get_rng_state()
    order(3)
    assert torch.equal(before, torch.get_rng_state())
    batches = list(make_loader(digits.test, 100, shuffle=False))
    assert [len(b[1]) for b in batches] == [100, 100, 100, len(digits.test) - 300]


def test_batched_fetch_equals_single_items(digits):
    xs, ys = digits.test.get_batch([3, 1, 4])
    for row, i in enumerate([3, 1, 4]):
        x, y = digits.test[i]
        assert torch.equal(x, xs[row]) and int(y) == int(ys[row])


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[n], w) for w in windows)
    assert torch.equal(out, random_crop(x, 2, torch.Generator().manual_seed(0)))


def test_flip_and_crop_flip_are_deterministic_given_the_generator():
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    flipped = random_horizontal_flip(x, torch.Generator().manual_seed(1))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    aug = RandomCropFlip(padding=1)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    with pytest.raises(ValueError, match=r"Argument 'x'"):
        random_crop(torch.zeros(3, 4, 4), 1, torch.Generator())


def test_dataset_augmentation_depends_on_seed_epoch_and_index_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8, generator=gen)
    ds = ArrayDataset(
        x,
        torch.zeros(20, dtype=torch.long),
        scale=1 / 255,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        transform=RandomCropFlip(2),
        seed=0,
    )
    first, _ = ds.get_batch([1, 2, 3])
    assert torch.equal(first, ds.get_batch([1, 2, 3])[0])
    ds.set_epoch(1)
    assert not torch.equal(first, ds.get_batch([1, 2, 3])[0])
    clean = ds.with_transform(None)
    expected = (x[[1]].double() / 255 - 0.5) / 0.25
    # float32 normalisation of values in [-2, 2]: a few float32 roundings of size <= 2
    tol = 8 * torch.finfo(torch.float32).eps * 2
    assert torch.allclose(clean.get_batch([1])[0].double(), expected, rtol=0, atol=tol)


def test_synthetic_datasets():
    mix = load_dataset("synthetic", n_train=30, n_test=12, dim=4, num_classes=3)
    assert mix.task == "classification" and mix.num_classes == 3
    assert (mix.in_channels, mix.input_size, mix.input_shape) == (4, 1, (4,))
    x, y = mix.train.get_batch(range(30))
    assert x.shape == (30, 4) and sorted(set(y.tolist())) == [0, 1, 2]
    reg = load_dataset("synthetic", kind="teacher_student", n_train=10, n_test=5, dim=3, outputs=2)
    assert reg.task == "regression" and reg.num_classes == 2
    assert reg.train.get_batch([0, 1])[1].shape == (2, 2)
    again = load_dataset("teacher_student", n_train=10, n_test=5, dim=3, outputs=2)
    assert torch.equal(again.train.targets, reg.train.targets)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match=r"Argument 'dataset'.*digits"):
        load_dataset("MNIST")
    with pytest.raises(ValueError, match=r"Argument 'kind'"):
        load_dataset("synthetic", kind="spirals")
    with pytest.raises(ValueError, match=r"Argument 'batch_size'"):
        make_loader(ArrayDataset(torch.zeros(2, 1), torch.zeros(2)), 0, shuffle=False)
    with pytest.raises(ValueError, match=r"Argument 'targets'"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4))


def test_first_digits_load_in_a_fresh_process_leaves_global_rngs_alone() -> None:
    """scikit-learn's first import (through ``rich``) draws from ``random``; we restore it."""
    import subprocess
    import sys

    script = (
        "import random, numpy as np\n"
        "from nets import load_dataset\n"
        "a, b = random.getstate(), np.random.get_state()[1].copy()\n"
        "load_dataset('digits')\n"
        "assert random.getstate() == a, 'random changed'\n"
        "assert (np.random.get_state()[1] == b).all(), 'numpy changed'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

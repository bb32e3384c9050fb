"""Reference datasets for examples and benchmarks, as float32 tensors (or a sparse count matrix).

* :func:`load_digits` — scikit-learn's bundled 8×8 digits, binarized (64 dimensions; needs no files).
* :func:`load_binarized_mnist` — statically binarized MNIST (Larochelle & Murray 2011 split, 50k/10k/10k) from
  an ``.npz`` of packed bits (``binarized_mnist.npz``) or from the original ``binarized_mnist_{train,valid,
  test}.amat`` files (text, or the MATLAB v5 copies that carry the same name).
* :func:`load_mnist` / :func:`load_fashion_mnist` — grey-scale images in [0, 1] (``mnist.npz`` /
  ``fashion_mnist.npz``: ``x_train``, ``x_test`` uint8); :func:`binarize` draws a dynamic binarization.
* :func:`load_20news` — 20 Newsgroups bag-of-words (``20news_bow.npz``, CSR arrays) as :class:`CountMatrix`,
  densified batch by batch.

Files are looked for in the directory given, else in ``$LEARNED_INFERENCE_DATA``, ``./data`` and
``../shared/data``; a missing file raises ``FileNotFoundError`` saying where the loader looked and how to get it.

Example:
    >>> digits = load_digits()
    >>> digits.train.shape, digits.test.shape, float(digits.train.max())
    (torch.Size([1500, 64]), torch.Size([297, 64]), 1.0)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CountMatrix",
    "Splits",
    "binarize",
    "find_data_file",
    "iterate_batches",
    "load_20news",
    "load_binarized_mnist",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
]

_HOW_TO_GET = {
    "binarized_mnist.npz": "the Larochelle & Murray binarized MNIST (see the data README's packed-bits format)",
    "mnist.npz": "MNIST as x_train/y_train/x_test/y_test uint8 arrays (Keras layout)",
    "fashion_mnist.npz": "Fashion-MNIST as x_train/y_train/x_test/y_test uint8 arrays (Keras layout)",
    "20news_bow.npz": "the ProdLDA 20 Newsgroups bag-of-words as CSR arrays (train_data, train_indices, ...)",
}


@dataclass(frozen=True)
class Splits:
    """A dataset's splits; ``valid`` is None where the dataset has no validation split."""

    train: Tensor
    test: Tensor
    valid: Tensor | None = None


def _search_dirs(path: str | os.PathLike[str] | None) -> list[Path]:
    if path is not None:
        return [Path(path)]
    dirs = [Path(d) for d in (os.environ.get("LEARNED_INFERENCE_DATA"),) if d]
    return [*dirs, Path("data"), Path("..") / "shared" / "data"]


def find_data_file(name: str, path: str | os.PathLike[str] | None = None) -> Path:
    """The first existing ``name`` (or ``path`` itself when it is a file) in the search directories.

    Raises:
        FileNotFoundError: naming every place looked in and what the file should contain.
    """
    if path is not None and Path(path).is_file():
        return Path(path)
    looked = [d / name for d in _search_dirs(path)]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(p.resolve()) for p in looked)
    what = _HOW_TO_GET.get(name, name)
    raise FileNotFoundError(
        f"{name} not found; looked in: {where}. Put {what} there, pass path=..., or set LEARNED_INFERENCE_DATA "
        "to the folder that holds it."
    )


def load_digits(*, threshold: float = 8.0, num_train: int = 1500) -> Splits:
    """scikit-learn's 8×8 digits (1797 images, grey levels 0..16) binarized at ``threshold``.

    The first ``num_train`` images (in scikit-learn's fixed order) are the training set, the rest the test set.
    Needs scikit-learn (``pip install scikit-learn``), which ships the data: no download.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from error
    x = torch.from_numpy((sklearn_digits().data > threshold).astype(np.float32))
    return Splits(train=x[:num_train], test=x[num_train:])


def _read_amat(file: Path) -> np.ndarray:
    """An ``.amat`` file: whitespace-separated 0/1 text, or a MATLAB v5 file with variable ``X``."""
    with file.open("rb") as handle:
        is_matlab = handle.read(6) == b"MATLAB"
    if is_matlab:
        try:
            from scipy.io import loadmat
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(f"{file} is a MATLAB file: reading it needs scipy (pip install scipy)") from error
        return np.asarray(loadmat(file)["X"], dtype=np.float32)
    return np.loadtxt(file, dtype=np.float32, ndmin=2)


def load_binarized_mnist(path: str | os.PathLike[str] | None = None) -> Splits:
    """Statically binarized MNIST, 50,000 / 10,000 / 10,000 images of 784 pixels in {0, 1}.

    Args:
        path: the ``.npz`` file, a folder holding ``binarized_mnist.npz``, or a folder holding the three
            ``binarized_mnist_{train,valid,test}.amat`` files.
    """
    folder = Path(path) if path is not None and Path(path).is_dir() else None
    if folder is not None and (folder / "binarized_mnist_train.amat").is_file():
        parts = {s: _read_amat(folder / f"binarized_mnist_{s}.amat") for s in ("train", "valid", "test")}
        return Splits(**{s: torch.from_numpy(a) for s, a in parts.items()})
    with np.load(find_data_file("binarized_mnist.npz", path), allow_pickle=False) as data:
        parts = {}
        for split in ("train", "valid", "test"):
            rows, cols = (int(v) for v in data[f"{split}_shape"])
            parts[split] = np.unpackbits(data[split], axis=1)[:rows, :cols].astype(np.float32)
    return Splits(**{s: torch.from_numpy(a) for s, a in parts.items()})


def _load_grey(name: str, path: str | os.PathLike[str] | None) -> Splits:
    with np.load(find_data_file(name, path), allow_pickle=False) as data:
        train, test = data["x_train"], data["x_test"]
    scale = lambda a: torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)  # noqa: E731
    return Splits(train=scale(train), test=scale(test))


def load_mnist(path: str | os.PathLike[str] | None = None) -> Splits:
    """MNIST grey levels in [0, 1], flattened to 784 (60,000 / 10,000); binarize batches with :func:`binarize`."""
    return _load_grey("mnist.npz", path)


def load_fashion_mnist(path: str | os.PathLike[str] | None = None) -> Splits:
    """Fashion-MNIST grey levels in [0, 1], flattened to 784 (60,000 / 10,000)."""
    return _load_grey("fashion_mnist.npz", path)


def binarize(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarization: each pixel ~ Bernoulli(grey level), drawn anew at every call."""
    return torch.bernoulli(x, generator=generator)


class CountMatrix:
    """A sparse ``[N, V]`` count matrix (CSR) whose rows are densified on demand.

    Args:
        data, indices, indptr: the CSR arrays (counts, column ids, row pointers).
        shape: ``(N, V)``.

    Example:
        >>> m = CountMatrix(np.array([2, 1]), np.array([0, 2]), np.array([0, 1, 2]), (2, 3))
        >>> m[[1, 0]]
        tensor([[0., 0., 1.],
                [2., 0., 0.]])
    """

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> None:
        if len(indptr) != shape[0] + 1 or len(data) != len(indices):
            raise ValueError(f"inconsistent CSR arrays for shape {shape}: {len(indptr)=}, {len(data)=}, "
                             f"{len(indices)=}")
        self.data, self.indices, self.indptr = data, indices, indptr
        self.shape = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Tensor | np.ndarray | list[int] | slice) -> Tensor:
        """Dense float32 rows ``[len(rows), V]``."""
        ids = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows).reshape(-1)
        out = np.zeros((len(ids), self.shape[1]), dtype=np.float32)
        for i, row in enumerate(ids):
            start, end = self.indptr[row], self.indptr[row + 1]
            out[i, self.indices[start:end]] = self.data[start:end]
        return torch.from_numpy(out)

    def tokens(self) -> int:
        """Σ N_i, the total number of tokens (for perplexity)."""
        return int(self.data.sum())


def load_20news(path: str | os.PathLike[str] | None = None) -> tuple[CountMatrix, CountMatrix]:
    """20 Newsgroups bag-of-words (11,258 train / 7,487 test documents, 1,995 columns) as count matrices."""
    with np.load(find_data_file("20news_bow.npz", path), allow_pickle=False) as data:
        train, test = (
            CountMatrix(data[f"{s}_data"], data[f"{s}_indices"], data[f"{s}_indptr"], tuple(data[f"{s}_shape"]))
            for s in ("train", "test")
        )
        return train, test


def iterate_batches(
    data: Tensor | CountMatrix, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Mini-batches of ``data`` (a tensor or a :class:`CountMatrix`), shuffled with ``generator`` if asked."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if isinstance(data, Tensor):
        order = order.to(data.device)  # one copy per epoch, not one per batch
    for start in range(0, n, batch_size):
        yield data[order[start:start + batch_size]]

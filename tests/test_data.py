"""Data loaders: synthetic files in every supported format, plus the real files when ../shared/data is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learned_inference.data import (
    CountMatrix,
    binarize,
    iterate_batches,
    load_20news,
    load_binarized_mnist,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bits(rng, rows, cols=784):
    return (rng.random((rows, cols)) < 0.2).astype(np.uint8)


def test_binarized_mnist_from_packed_npz(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"train": _bits(rng, 5), "valid": _bits(rng, 3), "test": _bits(rng, 2)}
    arrays = {}
    for name, bits in splits.items():
        arrays[name] = np.packbits(bits, axis=1)
        arrays[f"{name}_shape"] = np.array(bits.shape)
    np.savez_compressed(tmp_path / "binarized_mnist.npz", **arrays)
    data = load_binarized_mnist(tmp_path)
    for name, bits in splits.items():
        assert torch.equal(getattr(data, name), torch.from_numpy(bits.astype(np.float32)))


def test_binarized_mnist_from_text_amat(tmp_path):
    rng = np.random.default_rng(1)
    splits = {"train": _bits(rng, 4), "valid": _bits(rng, 2), "test": _bits(rng, 3)}
    for name, bits in splits.items():
        np.savetxt(tmp_path / f"binarized_mnist_{name}.amat", bits, fmt="%d")
    data = load_binarized_mnist(tmp_path)
    assert torch.equal(data.test, torch.from_numpy(splits["test"].astype(np.float32)))


def test_binarized_mnist_from_matlab_amat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    splits = {"train": _bits(rng, 4), "valid": _bits(rng, 2), "test": _bits(rng, 3)}
    for name, bits in splits.items():
        with (tmp_path / f"binarized_mnist_{name}.amat").open("wb") as handle:
            scipy_io.savemat(handle, {"X": bits})
    data = load_binarized_mnist(tmp_path)
    assert torch.equal(data.valid, torch.from_numpy(splits["valid"].astype(np.float32)))


def test_grey_images_scale_to_unit_interval_and_binarize(tmp_path):
    rng = np.random.default_rng(3)
    images = {k: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for k, n in (("x_train", 6), ("x_test", 4))}
    np.savez_compressed(tmp_path / "fashion_mnist.npz", y_train=np.zeros(6), y_test=np.zeros(4), **images)
    data = load_fashion_mnist(tmp_path / "fashion_mnist.npz")
    assert data.train.shape == (6, 784) and data.test.dtype == torch.float32
    torch.testing.assert_close(data.test * 255, torch.from_numpy(images["x_test"].reshape(4, -1).astype(np.float32)))
    draws = torch.stack([binarize(data.train, generator=torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0), data.train, atol=0.12, rtol=0)


def test_20news_rows_densify_on_demand(tmp_path):
    dense = np.array([[0, 2, 0, 1], [3, 0, 0, 0], [0, 0, 5, 1]], dtype=np.int32)
    arrays = {}
    for split in ("train", "test"):
        rows = [np.nonzero(r)[0] for r in dense]
        arrays[f"{split}_indices"] = np.concatenate(rows).astype(np.int32)
        arrays[f"{split}_data"] = np.concatenate([dense[i, r] for i, r in enumerate(rows)]).astype(np.int32)
        arrays[f"{split}_indptr"] = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        arrays[f"{split}_shape"] = np.array(dense.shape)
    np.savez_compressed(tmp_path / "20news_bow.npz", **arrays)
    train, test = load_20news(tmp_path)
    assert torch.equal(train[[2, 0]], torch.from_numpy(dense[[2, 0]].astype(np.float32)))
    assert torch.equal(test[0:3], torch.from_numpy(dense.astype(np.float32)))
    assert train.tokens() == dense.sum() and len(test) == 3
    batches = list(iterate_batches(train, 2, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 1]
    assert torch.equal(torch.cat(batches).sum(0), torch.from_numpy(dense.sum(0).astype(np.float32)))


def test_count_matrix_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="inconsistent CSR"):
        CountMatrix(np.array([1]), np.array([0]), np.array([0, 1]), (3, 2))


def test_missing_file_says_where_it_looked_and_what_to_put_there(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNED_INFERENCE_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mnist.npz not found; looked in: .*Put MNIST"):
        load_mnist()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere")):
        load_binarized_mnist(tmp_path / "elsewhere")


def test_embedded_digits_need_no_files():
    pytest.importorskip("sklearn")
    digits = load_digits()
    assert digits.train.shape == (1500, 64) and digits.test.shape == (297, 64)
    assert set(digits.train.unique().tolist()) == {0.0, 1.0}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_files_load_with_documented_shapes_and_means():
    mnist = load_binarized_mnist(SHARED)
    assert (mnist.train.shape, mnist.valid.shape, mnist.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert abs(mnist.test.mean().item() - 0.13251) < 1e-4
    grey = load_mnist(SHARED)
    assert grey.train.shape == (60000, 784) and abs(grey.train.mean().item() - 0.13066) < 1e-3
    train, test = load_20news(SHARED)
    assert train.shape == (11258, 1995) and test.shape == (7487, 1995)
    assert train.tokens() == 991_493 and test.tokens() == 629_312

"""Dataset items and the paper's augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmnet.data.dataset import SegmentationDataset
from lmnet.data.layouts import discover
from tests.miniatures import make_kvasir


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return discover(make_kvasir(tmp_path_factory.mktemp("kv") / "kvasir-seg", n=4))[1]


def _dataset(samples, train: bool, seed: int = 0) -> SegmentationDataset:
    return SegmentationDataset(samples, 64, train=train, seed=seed)


def test_items_are_normalised_tensors_and_binary_masks(samples):
    ds = _dataset(samples, train=True)
    x, y, i = ds[2]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (64, 64) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1}
    assert i == 2 and -3 < float(x.mean()) < 3


def test_augmentation_is_a_function_of_seed_epoch_and_index(samples):
    a, b = _dataset(samples, True, seed=0), _dataset(samples, True, seed=0)
    for idx in range(4):
        torch.testing.assert_close(a[idx][0], b[idx][0])
    # ...and does not depend on the order items are read in (multi-process loading).
    reversed_first = [b[i][0] for i in reversed(range(4))][::-1]
    for idx in range(4):
        torch.testing.assert_close(a[idx][0], reversed_first[idx])
    views = []
    for epoch in range(6):
        a.set_epoch(epoch)
        views.append(a[0][0])
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_eval_items_are_not_augmented(samples):
    ds = _dataset(samples, train=False)
    first = ds[1][0]
    ds.set_epoch(3)
    torch.testing.assert_close(ds[1][0], first)
    img = ds.cache[1][0].astype(np.float32).transpose(2, 0, 1)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1) * 255
    np.testing.assert_allclose(first.numpy(), (img - mean) / std, rtol=1e-5, atol=1e-5)


def test_progressive_resizing_changes_the_training_size_only(samples):
    ds = _dataset(samples, train=True)
    assert ds[0][0].shape == (3, 64, 64)
    ds.set_output_size(32)
    x, y, _ = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(y.unique().tolist()) <= {0, 1}
    ds.set_output_size(64)
    torch.testing.assert_close(ds[0][0], _dataset(samples, train=True)[0][0])  # same stream again
    with pytest.raises(ValueError, match="training dataset"):
        _dataset(samples, train=False).set_output_size(32)


def test_one_preprocessing_path_for_training_and_serving(samples):
    """An evaluation item is exactly what lmnet.deploy.preprocess makes of the same image."""
    from lmnet.data.dataset import load_sample
    from lmnet.deploy import preprocess

    ds = _dataset(samples, train=False)
    for i in range(len(samples)):
        image, _ = load_sample(samples[i])
        served = preprocess([image], 64, ds.mean, ds.std)[0]
        assert torch.equal(ds[i][0], served)

"""Class-balanced weights and the loss's additivity over batch halves."""
from __future__ import annotations

import pytest
import torch

from lmnet.losses import SegmentationLoss, class_balanced_weights


def test_class_balanced_weights_by_hand():
    beta = 0.9999
    w = class_balanced_weights([50_000, 10_000], beta)
    e_bg, e_fg = (1 - beta**50_000) / (1 - beta), (1 - beta**10_000) / (1 - beta)
    expected = torch.tensor([1 / e_bg, 1 / e_fg])
    torch.testing.assert_close(w, expected / expected.sum() * 2)
    assert w[1] > w[0]  # the rarer lesion weighs more
    with pytest.raises(ValueError, match="needs pixels"):
        class_balanced_weights([100, 0])


@pytest.mark.parametrize("n_classes", [1, 2])
def test_loss_of_a_batch_is_the_mean_of_its_halves(n_classes):
    loss = SegmentationLoss(torch.tensor([0.7, 1.3]), dice_weight=1.0, n_classes=n_classes)
    logits = torch.randn(4, n_classes, 16, 16)
    target = torch.randint(0, 2, (4, 16, 16))
    whole = loss(logits, target)
    halves = (loss(logits[0::2], target[0::2]) + loss(logits[1::2], target[1::2])) / 2
    torch.testing.assert_close(whole, halves)


def test_perfect_prediction_has_low_loss():
    loss = SegmentationLoss(torch.tensor([1.0, 1.0]))
    target = torch.randint(0, 2, (2, 8, 8))
    good = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    assert loss(good, target) < 0.01 < loss(-good, target)

"""Splits: reproducible, disjoint, stratified (BUSI), patient-grouped (LGG), k-fold."""
from __future__ import annotations

from collections import Counter

import pytest

from lmnet.data.layouts import discover
from lmnet.data.splits import SPLITS, load_split, make_kfold_split, make_split, save_split
from tests.miniatures import BUSI_COUNTS


@pytest.fixture(scope="module")
def busi(busi_mini):
    return discover(busi_mini)[1]


@pytest.fixture(scope="module")
def lgg(lgg_mini):
    return discover(lgg_mini)[1]


def _check_partition(split, samples):
    names = [n for k in SPLITS for n in split[k]]
    assert len(names) == len(set(names)) == len(samples)
    assert set(names) == {s.name for s in samples}


def test_holdout_is_reproducible_and_disjoint(busi):
    a, b = make_split(busi, seed=3), make_split(busi, seed=3)
    assert a == b
    assert make_split(busi, seed=4)["test"] != a["test"]
    _check_partition(a, busi)
    # each class is split 0.8 / 0.1 / 0.1, rounded per class (real BUSI subset: 272 / 34 / 34)
    assert len(a["train"]) == 16 and len(a["val"]) + len(a["test"]) == 4


def test_busi_split_is_stratified(busi):
    split = make_split(busi, seed=0)
    group = {s.name: s.group for s in busi}
    for k, ratio in zip(SPLITS, (0.8, 0.1, 0.1)):
        counts = Counter(group[n] for n in split[k])
        for g, total in BUSI_COUNTS.items():
            assert abs(counts[g] - ratio * total) <= 1, (k, g, counts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lgg_no_patient_in_two_splits(lgg, seed):
    split = make_split(lgg, seed=seed)
    patient = {s.name: s.patient for s in lgg}
    sets = [{patient[n] for n in split[k]} for k in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    _check_partition(split, lgg)
    for fold in range(4):
        kf = make_kfold_split(lgg, k=4, fold=fold, seed=seed)
        sets = [{patient[n] for n in kf[k]} for k in SPLITS]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_kfold_test_sets_partition_the_data(busi):
    tests = [set(make_kfold_split(busi, k=5, fold=f, seed=0)["test"]) for f in range(5)]
    assert sum(len(t) for t in tests) == len(busi)
    assert set().union(*tests) == {s.name for s in busi}
    for f in range(5):
        split = make_kfold_split(busi, k=5, fold=f, seed=0)
        _check_partition(split, busi)
        assert len(split["val"]) > 0
    with pytest.raises(ValueError, match="fold"):
        make_kfold_split(busi, k=5, fold=5)


def test_save_and_load(busi, tmp_path):
    split = make_split(busi, seed=1)
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json", busi) == split
    bad = dict(split, test=split["test"] + ["benign/nope"])
    save_split(bad, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not in the dataset"):
        load_split(tmp_path / "bad.json", busi)
    twice = dict(split, val=split["val"] + split["test"][:1])
    save_split(twice, tmp_path / "twice.json")
    with pytest.raises(ValueError, match="two splits"):
        load_split(tmp_path / "twice.json")


def test_bad_ratios(busi):
    with pytest.raises(ValueError, match="ratios"):
        make_split(busi, ratios=(0.0, 0.5, 0.5))

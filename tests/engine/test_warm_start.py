"""Runs that start from trained weights (``init_weights``): a pretrained folder trains in deployed
form, a run folder in its own form; the run resumes, evaluates and carries both stages in its card;
weights of another architecture are refused before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

import lmnet
from lmnet.cli.main import main
from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import load_checkpoint, model_from_checkpoint
from lmnet.engine.callbacks import Callback
from lmnet.engine.model_card import model_card
from lmnet.engine.train import Trainer, train

SMALL = {"image_size": 32, "batch_size": 8, "epochs": 1, "split_ratios": [0.5, 0.25, 0.25],
         "lr": 1e-3}


class _FirstWeights(Callback):
    """The model's weights when training starts."""

    def on_fit_start(self, trainer) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture()
def pretrained_folder(tiny_checkpoint, tmp_path):
    model, _ = model_from_checkpoint(tiny_checkpoint, channels_last=False)
    return model.save_pretrained(tmp_path / "pretrained")  # deployed, fp16


def test_a_pretrained_folder_trains_in_deployed_form(disc_data, pretrained_folder, tmp_path):
    first = _FirstWeights()
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="warm",
                      init_weights=str(pretrained_folder), **SMALL)
    run = Trainer(cfg, progress=False, callbacks=[first]).fit()
    expected = lmnet.from_pretrained(pretrained_folder, channels_last=False).state_dict()
    assert first.state.keys() == expected.keys()
    assert all(torch.equal(first.state[k], expected[k]) for k in expected)  # the fp16 values, exactly
    saved = json.loads((run / "config.json").read_text())
    assert saved["deployed_form"] is True and saved["init_weights"] == str(pretrained_folder)
    init = json.loads((run / "init.json").read_text())
    assert init["form"] == "deployed" and init["train_config"]["model"] == "lmnet"
    trained = load_checkpoint(run)["model"]
    assert trained.keys() == expected.keys()  # the re-parameterised network is what trained
    assert any(not torch.equal(trained[k], expected[k]) for k in expected)
    # it resumes (longer schedule) and evaluates in that form
    train(cfg, resume=run, progress=False, overrides={"epochs": 2})
    assert load_checkpoint(run / "checkpoint_last.pt")["epoch"] == 1
    assert main(["evaluate", str(run), "--quiet"]) == 0
    card = model_card(run, curve=False)
    assert "**Stage 1**" in card and "warm restart" in card and "deployed form" in card


def test_a_run_folder_trains_in_its_own_form(disc_data, tiny_checkpoint, tmp_path):
    first = _FirstWeights()
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="again",
                      init_weights=str(tiny_checkpoint), **SMALL)
    run = Trainer(cfg, progress=False, callbacks=[first]).fit()
    expected = load_checkpoint(tiny_checkpoint)["model"]
    assert all(torch.equal(first.state[k], expected[k]) for k in expected)  # BN statistics too
    assert json.loads((run / "config.json").read_text())["deployed_form"] is False
    assert json.loads((run / "init.json").read_text())["form"] == "training"


def test_weights_of_another_model_are_refused_before_anything_is_written(disc_data, tiny_checkpoint,
                                                                        tmp_path, capsys):
    argv = ["train", "--data", str(disc_data), "--out", str(tmp_path), "--name", "bad",
            "--model", "basic_unet", "--init-weights", str(tiny_checkpoint), "--image-size", "32",
            "--epochs", "1"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "do not fit this run" in err and "'lmnet'" in err and "'basic_unet'" in err
    assert not (tmp_path / "bad").exists()


def test_a_warm_restart_of_a_warm_restart_carries_every_stage_in_its_card(
        disc_data, pretrained_folder, tmp_path):
    """Stage 2 starts from a pretrained folder and is exported with its card; stage 3 starts from
    that export. Stage 3's card names three stages: the first from stage 2's card, the second
    from stage 2's own config, its own last; the time lines of stage 2 say whose they are."""
    from lmnet.engine.model_card import export_with_card

    stage2 = train(TrainConfig(data=str(disc_data), out=str(tmp_path), name="stage2",
                               init_weights=str(pretrained_folder), **SMALL), progress=False)
    shipped2 = export_with_card(stage2, tmp_path / "stage2_weights")
    card2 = (shipped2 / "README.md").read_text()
    assert "**Stage 2** (this run)" in card2 and "**Stage 3**" not in card2
    stage3 = train(TrainConfig(data=str(disc_data), out=str(tmp_path), name="stage3",
                               init_weights=str(shipped2), **{**SMALL, "lr": 5e-4, "epochs": 2}),
                   progress=False)
    init = json.loads((stage3 / "init.json").read_text())
    assert any(line.startswith("**Stage 2** (this run)") for line in init["card_recipe"])
    card3 = model_card(stage3, curve=False)
    recipe = card3.split("## Recipe")[1].split("## Training time")[0]
    stages = [line for line in recipe.splitlines() if line.startswith("- **Stage")]
    assert [s.split("**")[1] for s in stages] == ["Stage 1", "Stage 2", "Stage 3"], stages
    assert "(from `stage2_weights`'s own card)" in stages[0] and "`pretrained`" in stages[0]
    assert "(the starting weights): `stage2_weights`" in stages[1]
    assert "a warm restart of stage 1 in deployed form, trained for 1 epochs" in stages[1]
    assert "lr 0.001" in stages[1] and "(this run)" in stages[2]
    assert "lr 0.0005" in recipe.split(stages[2])[1]  # this run's own schedule follows
    assert "starting from the weights of stage 2" in recipe
    times = card3.split("## Training time and machine")[1].split("## ")[0]
    assert "2 of 2 epochs (stage 3; earlier stages below)" in times
    assert "- Stage 2, from its own card: 1 of 1 epochs (stage 2; " in times
    assert "Stage 2, from its own card: Stage" not in times
    assert "(after the 2 earlier stages above)" in card3

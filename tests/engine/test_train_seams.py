"""The Trainer's seams: builders passed in or overridden, train_step, callbacks, and the planner
timing the real step."""
from __future__ import annotations

import csv

import pytest
import torch

from lmnet.config import TrainConfig
from lmnet.engine.callbacks import Callback
from lmnet.engine.train import Trainer, load_optimizer_state, step_seconds
from lmnet.losses import SegmentationLoss

SMALL = {"image_size": 32, "batch_size": 4, "epochs": 2, "split_ratios": [0.5, 0.25, 0.25],
         "grad_accum": 2}


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.rows: list[dict] = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start {epoch}")

    def on_step_end(self, trainer, loss):
        self.events.append("step")

    def on_epoch_end(self, trainer, row, val):
        self.events.append(f"epoch_end {row['epoch']}")
        self.rows.append(row)

    def on_checkpoint(self, trainer, state, improved):
        self.events.append("checkpoint")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


def test_builders_can_be_passed_in_and_callbacks_see_every_event(disc_data, tmp_path):
    used = []

    def loss_fn(cfg, weights):
        used.append("loss")
        return SegmentationLoss(weights, dice_weight=0.0, n_classes=cfg.n_classes)  # CE only

    def optimizer_fn(cfg, params):
        used.append("optimizer")
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def scheduler_fn(cfg, optimizer):
        used.append("scheduler")
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    rec = Recorder()
    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="seams", **SMALL)
    trainer = Trainer(cfg, progress=False, callbacks=[rec], loss_fn=loss_fn,
                      optimizer_fn=optimizer_fn, scheduler_fn=scheduler_fn)
    run = trainer.fit()
    assert used == ["loss", "optimizer", "scheduler"]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert [r["lr"] for r in rec.rows] == [0.005, 0.0025]  # StepLR halved it after each epoch
    steps = trainer.steps
    assert rec.events[0] == "fit_start" and rec.events[-1] == "fit_end"
    assert rec.events[1:1 + steps + 3] == ["epoch_start 0", *["step"] * steps, "epoch_end 1", "checkpoint"]
    with (run / "log.csv").open(newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]  # the default callbacks ran too


def test_train_step_can_be_overridden(disc_data, tmp_path):
    class Counting(Trainer):
        calls = 0

        def train_step(self, x, y):
            Counting.calls += 1
            assert x.shape[0] == 4  # the whole batch; the micro-batches are the step's business
            return super().train_step(x, y)

    cfg = TrainConfig(data=str(disc_data), out=str(tmp_path), name="sub", **{**SMALL, "epochs": 1})
    trainer = Counting(cfg, progress=False)
    trainer.fit()
    assert Counting.calls == trainer.steps > 0


def test_the_planner_times_the_real_train_step(monkeypatch):
    calls = []
    real = Trainer.train_step

    def counted(self, x, y):
        calls.append(tuple(x.shape))
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", counted)
    cfg = TrainConfig(data="unused", model="lmnet_t10_mb", image_size=32, batch_size=8, grad_accum=2)
    assert step_seconds(cfg, probe_batch=2) > 0
    assert calls == [(4, 3, 32, 32)] * 4  # a warm-up and three timed steps, 2 micro-batches of 2


def test_a_run_stopped_by_the_code_before_the_trainer_resumes_exactly(tmp_path, monkeypatch):
    """``tests/fixtures/resume_before_trainer``: a run that lmnet 376923b (one long training
    function, before the Trainer) stopped after epoch 1 of 2, and the weights and log of the
    same run trained without a stop by that code (``make_resume_fixture.py`` says how). Today's
    code resumes the stopped run and ends where the old code's uninterrupted run ended."""
    import json
    import shutil

    from lmnet.config import TrainConfig
    from lmnet.engine.train import train
    from tests.conftest import ROOT
    from tests.fixtures.make_resume_fixture import digest
    from tests.miniatures import make_discs

    fixture = ROOT / "tests" / "fixtures" / "resume_before_trainer"
    expected = json.loads((fixture / "expected.json").read_text())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "runs" / "stopped"
    run.mkdir(parents=True)
    for name in ("config.json", "split.json", "log.csv", "checkpoint_last.pt"):
        shutil.copy2(fixture / name, run / name)
    config = json.loads((run / "config.json").read_text())
    config.update(data=str(make_discs(tmp_path / "data")), out=str(tmp_path / "runs"))
    (run / "config.json").write_text(json.dumps(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made
    try:
        train(TrainConfig.from_dict(config), resume=run, progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()]
    assert rows[0] == expected["log_header"] and len(rows) == 3
    header = expected["log_header"]
    for got, want in zip(rows[1:], expected["log"]):
        for col in ("epoch", "train_size", "train_loss", "val_paper_mdice", "val_fg_dice", "lr"):
            i = header.index(col)
            # the epoch's mean loss follows the kernels' rounding of the CPU: 2.8e-4 of it apart
            # on an AVX2 Zen 3 from the machine that made the fixture (1e-3 allowed); a
            # lost or repeated epoch moves it by 8e-3 (epoch 1's loss against epoch 2's)
            rel = 1e-3 if col == "train_loss" else 1e-4
            assert float(got[i]) == pytest.approx(float(want[i]), rel=rel, abs=1e-6), col
    weights = digest(run / "checkpoint_last.pt")
    assert weights.keys() == expected["weights"].keys()
    # a bias feeding a training-mode BatchNorm has a gradient of zero in exact arithmetic: what it
    # gets is rounding noise, which AdamW scales up to steps of the learning rate's size, so its
    # value depends on the summation order of every kernel, and that noise reaches the other
    # weights through the BatchNorm statistics. On another CPU (an AVX2 Zen 3 against the
    # fixture's machine) some BatchNorm biases of the branches ended 16 % of their size apart,
    # more than the epoch moved them. So the weights are compared as a whole, against how far the
    # epoch moves them: the sum over tensors of the change of their magnitude was 0.2 % of the
    # epoch's there; 2 % allowed, where a lost or repeated epoch is of the order of 100 %
    epoch_1 = digest(fixture / "checkpoint_last.pt")
    for k in (0, 1):  # the sum, then the magnitude, of each tensor
        moved = sum(abs(epoch_1[n][k] - w[k]) for n, w in expected["weights"].items())
        off = sum(abs(weights[n][k] - w[k]) for n, w in expected["weights"].items())
        assert off < 0.02 * moved, (k, off, moved)


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))


def _steps(net: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_the_default_optimiser_is_fused_adamw_with_the_same_updates():
    """On a CPU the Trainer's AdamW is PyTorch's fused one: the same update as the per-tensor
    AdamW to fp32 rounding, and either one's state dict resumes the other."""
    cfg = TrainConfig(model="basic_unet", lr=1e-2, weight_decay=0.1)
    fused_net, plain_net = _small_net(), _small_net()
    fused = Trainer(cfg, progress=False).build_optimizer(fused_net)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(plain_net.parameters(), lr=1e-2, weight_decay=0.1)
    start = [p.detach().clone() for p in plain_net.parameters()]
    _steps(fused_net, fused, 5, seed=1)
    _steps(plain_net, plain, 5, seed=1)
    for a, b, s in zip(fused_net.parameters(), plain_net.parameters(), start):
        assert not torch.equal(b, s)  # the steps moved the weights
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint of the per-tensor AdamW resumes in the fused one, and the other way round,
    # each keeping its own kind (PyTorch's loading alone would take the checkpoint's)
    resumed = Trainer(cfg, progress=False).build_optimizer(fused_net)
    load_optimizer_state(resumed, plain.state_dict())
    load_optimizer_state(plain, fused.state_dict())
    assert resumed.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    _steps(fused_net, resumed, 2, seed=2)
    _steps(plain_net, plain, 2, seed=2)
    for a, b in zip(fused_net.parameters(), plain_net.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # ... so a gradient scaler (mixed precision) steps it: a per-tensor AdamW that kept the fused
    # kind's claim to take the scale itself failed here
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(fused_net(torch.randn(2, 3, 8, 8)).square().mean()).backward()
    scaler.step(resumed)
    scaler.update()


def test_without_a_fused_kernel_the_optimiser_is_the_per_tensor_adamw(monkeypatch):
    """A PyTorch without the fused AdamW for the parameters' device (a CPU before 2.4) refuses
    ``fused=True`` when the optimiser is built: training goes on with the per-tensor one."""
    import lmnet.engine.train as training

    real = torch.optim.AdamW

    def older(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                               "of supported devices: ['cuda']")
        return real(params, fused=fused, **kwargs)

    monkeypatch.setattr(training.torch.optim, "AdamW", older)
    opt = training.adamw(_small_net().parameters(), 1e-3, 0.0)
    assert isinstance(opt, real) and not opt.defaults["fused"]


def test_the_best_checkpoint_links_the_last_one_and_keeps_its_epoch(tmp_path, monkeypatch):
    """An improved epoch's ``checkpoint_best.pt`` is the ``checkpoint_last.pt`` just written (a
    hard link, not a second copy); the next epoch's last replaces its own file and leaves the best
    as it was; without hard links the state is written again."""
    import os

    from lmnet._files import atomic_save
    from lmnet.engine.callbacks import BestCheckpoint
    from lmnet.run_folder import RunFolder

    class FakeTrainer:
        folder = RunFolder(tmp_path)
        written: list = []

        def save_state(self, state, path):
            self.written.append(path.name)
            atomic_save(path, lambda tmp: torch.save(state, tmp), suffix_keep=False)

    trainer, best = FakeTrainer(), BestCheckpoint()

    def epoch(n, improved):
        state = {"epoch": n}
        trainer.save_state(state, trainer.folder.last)  # what Trainer.checkpoint does first
        best.on_checkpoint(trainer, state, improved)

    def epoch_in(path):
        return torch.load(path, weights_only=True)["epoch"]

    epoch(1, True)
    assert os.path.samefile(trainer.folder.best, trainer.folder.last)
    assert trainer.written == ["checkpoint_last.pt"]  # written once
    epoch(2, False)
    assert epoch_in(trainer.folder.best) == 1 and epoch_in(trainer.folder.last) == 2
    assert not os.path.samefile(trainer.folder.best, trainer.folder.last)

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    epoch(3, True)
    assert epoch_in(trainer.folder.best) == 3 and trainer.written[-1] == "checkpoint_best.pt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

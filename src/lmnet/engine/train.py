"""Training: :class:`Trainer` (the paper's recipe, with seams), exact resume, DDP, and the timing
of a training step for planning; :func:`train` is the entry point."""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lmnet._files import atomic_save
from lmnet._version import __version__
from lmnet.config import TrainConfig
from lmnet.data.dataset import SegmentationDataset, load_sample
from lmnet.data.layouts import DatasetError, Sample, discover
from lmnet.data.splits import load_split, make_kfold_split, make_split, save_split
from lmnet.deploy.checkpoint import build_model, load_checkpoint, load_weights
from lmnet.engine.callbacks import LOG_FIELDS, Callback, default_callbacks
from lmnet.engine.distributed import DistContext, resolve_device
from lmnet.engine.evaluate import evaluate_samples
from lmnet.engine.warm_start import initial_weights
from lmnet.losses import SegmentationLoss, class_balanced_weights
from lmnet.run_folder import RunFolder
from lmnet.runtime import ThreadGovernor, amx_bf16, cpu_name, installed_versions

__all__ = ["Trainer", "train", "adamw", "load_optimizer_state", "run_folder", "run_split", "read_log", "read_sessions", "step_seconds", "step_memory",
           "LOG_FIELDS", "RESUME_OVERRIDABLE"]

log = logging.getLogger(__name__)

#: Keys that ``--resume`` may change; every other key comes from the run's own config.
RESUME_OVERRIDABLE = ("epochs", "time_budget", "num_workers", "device")
#: An override value that sets a key back to its default (None) on resume, where a None
#: override means "not given" and keeps the run's own value.
CLEAR = object()


def run_folder(cfg: TrainConfig, fmt: str) -> Path:
    """``<out>/<name>``, the name defaulting to ``<format>_<model>_s<seed>`` (plus the fold)."""
    name = cfg.name or f"{fmt}_{cfg.model}_s{cfg.seed}" + (f"_fold{cfg.fold}" if cfg.kfold else "")
    return Path(cfg.out) / name


def _versions() -> dict[str, Any]:
    info: dict[str, Any] = {"lmnet": __version__, "python": sys.version.split()[0],
                            "torch": torch.__version__, "numpy": np.__version__,
                            "platform": platform.platform(), "cpu": cpu_name(),
                            "threads": torch.get_num_threads(),
                            "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    from lmnet.layers.native import native_status

    info["native_kernels"] = native_status()
    info.update(installed_versions("monai", "albumentations", "cv2", "PIL"))
    try:
        src = Path(__file__).resolve().parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def run_split(cfg: TrainConfig, samples: list[Sample], run_dir: Path | None = None,
              resume: bool = False) -> dict[str, Any]:
    """The split a run of ``cfg`` trains on: its ``split_file``; on resume, the run's own
    ``split.json``; else drawn (hold-out or k-fold) from ``cfg``'s ratios and split seed."""
    if cfg.split_file:
        return load_split(cfg.split_file, samples)
    if resume and run_dir is not None and RunFolder(run_dir).split.is_file():
        return load_split(RunFolder(run_dir).split, samples)
    if cfg.kfold:
        return make_kfold_split(samples, cfg.kfold, cfg.fold, cfg.split_rng_seed,
                                val_ratio=cfg.split_ratios[1])
    return make_split(samples, cfg.split_ratios, cfg.split_rng_seed)


def _rng_state() -> dict[str, Any]:
    """Every generator's state in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)  # a tuple with an ndarray in checkpoints of lmnet 0.1.0
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_memory(cfg: TrainConfig, size: int | None = None) -> int:
    """About how many bytes one training micro-batch of ``cfg`` needs at ``size`` (default
    ``cfg.image_size``): the activations autograd keeps for one image (measured by a forward
    pass of one random image, nothing trained), times the micro-batch, times 1.4 for the
    backward pass's temporaries, plus weights, gradients and AdamW's two moments. Measured on
    LM-Net and BasicUNet at 256 x 256 it is within 10 % of the peak resident memory."""
    size = size or cfg.image_size
    model = build_model(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, cfg.in_channels, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(1.4 * sum(storages.values()) * micro + 4 * weights)


def step_seconds(cfg: TrainConfig, size: int | None = None, probe_batch: int | None = None) -> float:
    """Measured seconds of one optimiser step of ``cfg`` at ``size`` (default ``cfg.image_size``)
    on random data, on the CPU: :meth:`Trainer.train_step` itself (``grad_accum`` micro-batches,
    the recipe's loss, AdamW with its weight decay), the median of three steps after a warm-up
    step. For planning: epochs that fit a budget, a matrix's estimated time.

    ``probe_batch``: time micro-batches of at most this many images and scale to the recipe's
    micro-batch (the time of these convolutions grows in proportion to the batch), so that an
    estimate never needs the memory of a full micro-batch."""
    size = size or cfg.image_size
    trainer = Trainer(cfg, progress=False)
    trainer.setup(torch.ones(max(2, cfg.n_classes)))  # class weights do not change the time
    trainer.model.train()
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    timed = min(micro, probe_batch) if probe_batch else micro
    x = torch.randn(timed * cfg.grad_accum, cfg.in_channels, size, size)
    y = torch.randint(0, 2, (timed * cfg.grad_accum, size, size))
    times = []
    for _ in range(4):  # one warm-up step, then the median of three
        t = time.perf_counter()
        trainer.train_step(x, y)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])) * micro / timed


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has the fused kernel for the parameters (float, on a CPU or
    CUDA; a CPU since PyTorch 2.4): one pass over all parameters instead of a few whole-tensor
    operations per parameter (LM-Net's 514 tensors: 29 ms a step -> 5 ms on two cores of the
    model-207 Xeon). The same update to fp32 rounding; the state dict has the same entries, and
    :func:`load_optimizer_state` resumes a checkpoint of either kind into this one."""
    params = list(params)
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError as err:  # a PyTorch without this device's fused kernel
            log.debug("fused AdamW not available here (%s): the per-tensor one", err)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


#: Optimiser settings that say how it computes, not what: they stay the running optimiser's
#: when a checkpoint is loaded into it (see :func:`load_optimizer_state`).
_KIND_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimiser's own kind (fused or not).

    PyTorch's loading takes every group setting from the checkpoint, ``fused`` included: a
    checkpoint of a per-tensor AdamW (lmnet before the fused default) would turn the fused
    optimiser back into a per-tensor one that still claims the fused kind's gradient-scaler
    support, and mixed precision on CUDA then fails at its first step; a fused checkpoint would
    ask for a kernel another machine's PyTorch may not have. The moments, steps and learning
    rates come from the checkpoint as before."""
    saved = state.get("param_groups", [])
    if len(saved) == len(optimizer.param_groups):
        saved = [{**group, **{k: now[k] for k in _KIND_KEYS if k in now}}
                 for group, now in zip(saved, optimizer.param_groups)]
        state = {**state, "param_groups": saved}
    optimizer.load_state_dict(state)


def _check_readable(samples: list[Sample], channels: int) -> None:
    """Decode every file of ``samples`` now, so that a broken test image stops the run before
    training instead of ``lmnet evaluate`` after it."""
    bad = []
    for s in samples:
        try:
            load_sample(s, channels)
        except Exception as err:  # noqa: BLE001 - every unreadable file is reported
            bad.append(str(err) if str(s.image) in str(err) else f"{s.image}: {err}")
    if bad:
        raise DatasetError(f"{len(bad)} file(s) of the test split cannot be read:\n  " + "\n  ".join(bad[:10]))


def _threads_note(threads: int, governor: ThreadGovernor) -> str:
    other = governor.changes[-1][2]
    if threads < governor.max_threads:
        return (f"note: other processes are using about {other:.1f} core(s): training with "
                f"{threads} thread(s) until they stop (faster than {governor.max_threads} that "
                "wait on each other)")
    return f"note: the cores are free again: training with {threads} threads"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _replica_difference(model: torch.nn.Module) -> float:
    """Largest absolute difference between any replica's parameters and rank 0's (all ranks call)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (all ranks call)."""
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp), suffix_keep=False)


def _prepare_run(cfg: TrainConfig, resume: bool | str | Path, overrides: dict[str, Any]
                 ) -> tuple[TrainConfig, str, list[Sample], Path]:
    """Resolve the config (a resumed run keeps its own), find the data and the run folder."""
    if resume and not isinstance(resume, bool):
        run_dir = Path(resume)
        saved = RunFolder(run_dir).read_config()
        if saved is None:
            raise FileNotFoundError(f"{run_dir} is not a run folder (no {RunFolder.CONFIG})")
        saved.update(out=str(run_dir.parent), name=run_dir.name)
        cfg = TrainConfig.from_dict(saved)
    if not cfg.data:
        raise ValueError("no dataset given: pass --data PATH or set 'data' in the config")
    if not resume:  # recorded as an absolute path: the run resumes from any folder
        cfg = cfg.replace(data=str(Path(cfg.data).expanduser().resolve()))
    fmt, samples, problems = discover(cfg.data, cfg.format)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetError(f"{len(problems)} problems in {cfg.data} (see lmnet check-data):\n  "
                           f"{shown}{more}")
    run_dir = run_folder(cfg, fmt)
    last = RunFolder(run_dir).last
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist")
        saved = RunFolder(run_dir).read_config()
        saved.update(out=cfg.out, name=run_dir.name)
        ignored = {k: v for k, v in overrides.items() if v is not None and k not in RESUME_OVERRIDABLE
                   and k not in ("out", "name") and saved.get(k) != v}
        if ignored:
            log.warning("--resume continues %s with its own config; ignored: %s (only %s may change)",
                        run_dir, ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
                        ", ".join(RESUME_OVERRIDABLE))
        saved.update({k: None if v is CLEAR else v for k, v in overrides.items()
                      if k in RESUME_OVERRIDABLE and v is not None})
        cfg = TrainConfig.from_dict(saved)
    elif last.exists():
        raise ValueError(f"{run_dir} already holds a run: continue it with --resume, or choose "
                         "another --name")
    return cfg, fmt, samples, run_dir


class Trainer:
    """One training run of ``cfg``, in pieces a researcher can replace (after nnU-Net v2's
    ``nnUNetTrainer`` and MONAI's ``SupervisedTrainer``).

    Subclass and override, or pass as arguments: ``build_model`` (``model_fn(cfg)``),
    ``build_loss`` (``loss_fn(cfg, class_weights)``), ``build_optimizer``
    (``optimizer_fn(cfg, params)``), ``build_scheduler`` (``scheduler_fn(cfg, optimizer)``), and
    :meth:`train_step` / :meth:`validate`. ``callbacks`` are added to :func:`default_callbacks`
    (the CSV log, TensorBoard, the progress bar, the best checkpoint, the time budget, the
    graceful stop; see :mod:`lmnet.engine.callbacks`). :meth:`state_dict` and
    :meth:`load_state_dict` hold everything a resume needs (``checkpoint_last.pt``).

    :meth:`fit` runs it and returns the run folder; ``lmnet.engine.train(cfg)`` is
    ``Trainer(cfg).fit()``.
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, callbacks: list[Callback] | None = None,
                 replan: Callable[[int, float], int | None] | None = None, resume_hint: bool = True,
                 ctx: DistContext | None = None,
                 model_fn: Callable[[TrainConfig], torch.nn.Module] | None = None,
                 loss_fn: Callable[[TrainConfig, torch.Tensor], torch.nn.Module] | None = None,
                 optimizer_fn: Callable[[TrainConfig, Any], torch.optim.Optimizer] | None = None,
                 scheduler_fn: Callable[[TrainConfig, torch.optim.Optimizer], Any] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.extra_callbacks = list(callbacks or [])
        self.replan = replan
        self.resume_hint = resume_hint
        self.ctx = ctx or DistContext()
        self._fns = {"model": model_fn, "loss": loss_fn, "optimizer": optimizer_fn,
                     "scheduler": scheduler_fn}
        self.device = torch.device("cpu")
        self.stop_reason: str | None = None
        self.threads_note = ""
        self.steps = self.steps_in_epoch = 0
        self.images_per_second = 0.0
        self.start_epoch, self.best, self.best_epoch = 0, -math.inf, -1
        self.resumed = False
        self.started = time.perf_counter()

    # -- seams ----------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The network (``cfg.model``), in training form unless ``cfg.deployed_form``; a new run
        with ``init_weights`` then gets those weights (:mod:`lmnet.engine.warm_start`)."""
        fn = self._fns["model"]
        return fn(self.cfg) if fn else build_model(self.cfg)

    def build_loss(self, class_weights: torch.Tensor) -> torch.nn.Module:
        """The paper's loss: class-balanced cross-entropy plus soft Dice."""
        fn = self._fns["loss"]
        if fn:
            return fn(self.cfg, class_weights)
        return SegmentationLoss(class_weights, self.cfg.dice_weight, self.cfg.n_classes)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW with the config's learning rate and decoupled weight decay."""
        fn = self._fns["optimizer"]
        if fn:
            return fn(self.cfg, model.parameters())
        return adamw(model.parameters(), self.cfg.lr, self.cfg.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """Cosine annealing over ``cfg.epochs`` to ``cfg.min_lr``, stepped once per epoch."""
        fn = self._fns["scheduler"]
        if fn:
            return fn(self.cfg, optimizer)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.cfg.epochs,
                                                          eta_min=self.cfg.min_lr)

    def bf16_note(self) -> str | None:
        """A one-line note where ``--bf16`` is expected to train slower than fp32: a CPU without
        AMX (its bf16 convolutions are slower than fp32's; ``docs/performance.md``)."""
        if not self.cfg.bf16 or self.device.type != "cpu" or amx_bf16():
            return None
        return (f"note: --bf16 on a CPU without AMX ({cpu_name()}): its bf16 convolutions run "
                "slower than fp32's, so this trains slower than without --bf16 "
                "(docs/performance.md)")

    def setup(self, class_weights: torch.Tensor) -> None:
        """Build model, loss, optimiser, scheduler, mixed precision on ``self.device`` (in this
        order: the model's initialisation draws from the seeded RNG)."""
        cfg, device = self.cfg, self.device
        self.criterion = self.build_loss(class_weights).to(device)
        self.model = self.build_model().to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        fp16 = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        if fp16:
            self.autocast: Any = torch.autocast("cuda", dtype=torch.float16)
        elif cfg.bf16:
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
            if (note := self.bf16_note()) and self.ctx.is_main:
                log.warning("%s", note)
        else:
            self.autocast = contextlib.nullcontext()
        self.net: torch.nn.Module = self.model

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on a batch: ``grad_accum`` micro-batches (images ``r::grad_accum``),
        each loss divided by their number, gradients summed, then the optimiser. Returns the loss."""
        cfg = self.cfg
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        parts = [r for r in range(cfg.grad_accum) if r < len(x)]
        step_loss = 0.0
        for r in parts:
            sync = (contextlib.nullcontext() if (r == parts[-1] or self.ctx.world == 1)
                    else self.net.no_sync())
            with sync:
                with self.autocast:
                    loss = self.criterion(self.net(x[r::cfg.grad_accum]), y[r::cfg.grad_accum]) / len(parts)
                self.scaler.scale(loss).backward()
            step_loss += float(loss.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return step_loss

    def validate(self) -> dict[str, Any]:
        """Validation metrics (all images together) at the training size, as the paper scores."""
        ev = evaluate_samples(self.model, self.val_samples, self.cfg, "resized", boundary=False,
                              dataset=self.val_ds, batch_size=max(1, self.per_rank))
        return ev.aggregate()["all"]

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, epoch: int, val: dict[str, Any] | None, cut: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        """Everything a resume needs after 0-based ``epoch``; ``cut``: the steps done in the next."""
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "best_score": self.best,
                "best_epoch": self.best_epoch, "rng": _rng_state(), "val": val, "format": self.fmt,
                "partial": cut}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint of :meth:`state_dict` (the RNG state included)."""
        load_weights(self.model, ckpt["model"], self.folder.last)
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scheduler.T_max = self.cfg.epochs
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.best, self.best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["best_epoch"]
        self.partial = ckpt.get("partial")
        if self.partial is not None:
            self.start_epoch = self.partial["epoch"]
        _set_rng_state(ckpt["rng"])
        if self.start_epoch >= self.cfg.epochs:
            log.info("run already finished %d of %d epochs", self.start_epoch, self.cfg.epochs)

    @staticmethod
    def save_state(state: dict[str, Any], path: Path) -> None:
        _atomic_save(state, path)

    def checkpoint(self, epoch: int, val: dict[str, Any] | None, cut: dict[str, Any] | None = None,
                   score: float | None = None) -> dict[str, Any]:
        """Write ``checkpoint_last.pt`` (updating the best score first when ``score`` beats it)
        and tell the callbacks."""
        improved = score is not None and score > self.best
        if improved:
            self.best, self.best_epoch = score, epoch
        state = self.state_dict(epoch, val, cut)
        self.save_state(state, self.folder.last)
        self._emit("on_checkpoint", state, improved)
        return state

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # -- the run ----------------------------------------------------------------------------------
    def fit(self, resume: bool | str | Path = False, overrides: dict[str, Any] | None = None) -> Path:
        """Train (or continue, see :func:`train`'s ``resume``); returns the run folder."""
        ctx = self.ctx
        cfg, fmt, samples, run_dir = _prepare_run(self.cfg, resume, overrides or {})
        self.cfg, self.fmt, self.run_dir, self.folder = cfg, fmt, run_dir, RunFolder(run_dir)
        self.resumed = bool(resume)
        self.device = device = resolve_device(cfg.device, ctx.local_rank)
        # a resumed run reads its checkpoint, a new one its init_weights, before anything is
        # written: a failed command changes nothing
        ckpt = load_checkpoint(self.folder.last, map_location=device) if self.resumed else None
        init = initial_weights(cfg) if cfg.init_weights and not self.resumed else None
        if init is not None:
            cfg = self.cfg = cfg.replace(init_weights=init.source, deployed_form=init.deployed)
        if cfg.batch_size % (ctx.world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                             f"= {ctx.world} x {cfg.grad_accum}")
        _seed_everything(cfg.seed)
        split = run_split(cfg, samples, run_dir, self.resumed)
        by_name = {s.name: s for s in samples}
        train_samples = [by_name[n] for n in split["train"]]
        self.val_samples = [by_name[n] for n in split["val"]]
        if not train_samples or not self.val_samples:
            raise ValueError(f"the split has {len(train_samples)} training and {len(self.val_samples)} "
                             "validation images; both need at least one (check split_ratios)")
        _check_readable([by_name[n] for n in split.get("test", [])], cfg.in_channels)  # train/val: below
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.folder.write_config(cfg.to_dict())
            save_split({**split, "format": fmt, "data": str(cfg.data)}, self.folder.split)
            env = _versions()
            self.folder.write_env(env)
            if init is not None:
                self.folder.write_init(init.record)
            done = 0 if ckpt is None else int(ckpt["epoch"]) + 1  # where and when each part ran:
            self.folder.add_session({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                     "epochs_done": done, "cpu": env["cpu"], "threads": env["threads"],
                                     "cuda": env["cuda"], "git_commit": env["git_commit"]})
        show = self.progress and ctx.is_main
        self.train_ds = SegmentationDataset(train_samples, cfg.image_size, True, cfg.in_channels,
                                            cfg.mean, cfg.std, cfg.seed, progress=show)
        self.val_ds = SegmentationDataset(self.val_samples, cfg.image_size, False, cfg.in_channels,
                                          cfg.mean, cfg.std, progress=show)
        lesion = np.mean([m.mean() for _, m in self.train_ds.cache]) * cfg.image_size**2
        weights = class_balanced_weights([cfg.image_size**2 - lesion, lesion], cfg.cb_beta)
        self.per_rank = cfg.batch_size // ctx.world
        self.sampler = DistributedSampler(self.train_ds, num_replicas=ctx.world, rank=ctx.rank,
                                          shuffle=True, seed=cfg.seed)
        self.setup(weights)
        if init is not None:
            load_weights(self.model, init.state, init.source)
        self.partial: dict[str, Any] | None = None  # progress inside an epoch that a stop cut short
        if ckpt is not None:
            self.load_state_dict(ckpt)
        if ctx.world > 1:
            self.net = DistributedDataParallel(self.model)
        self.callbacks = default_callbacks(self, self.progress) + self.extra_callbacks
        self.started = time.perf_counter()
        try:
            self._emit("on_fit_start")
            epoch, steps = self._loop()
        finally:
            self._emit("on_fit_end")
        self._finish(epoch, steps)
        return run_dir

    def _loop(self) -> tuple[int, int]:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        governor = ThreadGovernor(enabled=None if ctx.world == 1 and device.type == "cpu" else False)
        epoch, steps = self.start_epoch, 0
        for epoch in range(self.start_epoch, cfg.epochs):
            self.sampler.set_epoch(epoch)
            self.train_ds.set_epoch(epoch)
            self.train_ds.set_output_size(cfg.train_size(epoch))
            partial = self.partial
            done = partial if partial is not None and partial["epoch"] == epoch else None
            steps, seen, loss_sum, prior_s = ((done["steps"], done["seen"], done["loss_sum"], done["seconds"])
                                              if done else (0, 0, 0.0, 0.0))
            order = list(iter(self.sampler))[steps * self.per_rank:]  # a cut epoch goes on where it stopped
            # its own generator: a loader draws a seed when iterated, which must not move the global
            # RNG (dropout's), or a resumed epoch would differ from an uninterrupted one
            loader = DataLoader(self.train_ds, batch_size=self.per_rank, sampler=order,
                                num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            self.net.train()
            t0 = time.perf_counter()
            self.steps, self.steps_in_epoch = steps, steps + len(loader)
            self._emit("on_epoch_start", epoch)
            for x, y, _ in loader:
                step_loss = self.train_step(x, y)
                steps += 1
                changed = governor.update()
                self.threads_note = "" if changed is None else _threads_note(changed, governor)
                seen += len(x) * ctx.world
                loss_sum += step_loss
                self.steps = steps
                self.images_per_second = (seen - (done["seen"] if done else 0)) / (time.perf_counter() - t0)
                self._emit("on_step_end", step_loss)
                if ctx.world > 1 and cfg.time_budget and _any_rank(self.stop_reason is not None, device):
                    self.stop_reason = self.stop_reason or f"time budget of {cfg.time_budget} min reached"
                if self.stop_reason:
                    break
            epoch_s = prior_s + time.perf_counter() - t0
            total_steps = math.ceil(len(self.sampler) / self.per_rank)
            if steps < total_steps:  # cut short: keep its progress, resume goes on from this step
                if ctx.is_main:
                    self.checkpoint(epoch - 1, None, {"epoch": epoch, "steps": steps, "seen": seen,
                                                      "loss_sum": loss_sum, "seconds": epoch_s})
                break
            self.scheduler.step()
            if ctx.is_main:
                val = self.validate()
                row = {"epoch": epoch + 1, "train_size": cfg.train_size(epoch),
                       "train_loss": loss_sum / max(steps, 1),
                       "val_paper_mdice": val["paper_mdice"], "val_fg_dice": val["fg_dice_mean"],
                       "val_fg_iou": val["fg_iou_mean"], "lr": self.optimizer.param_groups[0]["lr"],
                       "epoch_seconds": round(epoch_s, 2), "images_per_second": round(seen / epoch_s, 3),
                       "steps": steps}
                score = val.get(cfg.select_metric.removeprefix("val_"))
                if score is None:
                    raise ValueError(f"select_metric {cfg.select_metric!r} is not a validation metric")
                self._emit("on_epoch_end", row, val)
                self.checkpoint(epoch, val, score=score)
            ctx.barrier()
            if self.stop_reason:
                break
            if self.replan is not None and ctx.world == 1 and epoch + 1 < cfg.epochs:
                new = self.replan(epoch + 1, time.perf_counter() - self.started)
                if new is not None and epoch + 1 <= new < cfg.epochs:
                    log.info("re-planned: %d epochs instead of %d", new, cfg.epochs)
                    self.cfg = cfg = cfg.replace(epochs=new)
                    self.scheduler.T_max = new  # the cosine now ends at the new last epoch
                    self.folder.write_config(cfg.to_dict())
                    self.checkpoint(epoch, val)  # the checkpoint's config says it too
            if epoch + 1 >= cfg.epochs:  # (the range above was made before any re-plan)
                break
        return epoch, steps

    def _finish(self, epoch: int, steps: int) -> None:
        ctx, reason = self.ctx, self.stop_reason
        if reason and ctx.is_main:
            where = (f"after step {steps} of epoch {epoch + 1}"
                     if steps < math.ceil(len(self.sampler) / self.per_rank) else f"after epoch {epoch + 1}")
            msg = (f"{reason} {where}; checkpoint_last.pt holds everything up to there. "
                   f"Continue with: lmnet train --resume {self.run_dir}")
            if (self.progress and self.resume_hint) or reason == "interrupted":
                log.warning("%s", msg)
            if reason == "interrupted":
                raise KeyboardInterrupt
        if ctx.world > 1:
            diff = _replica_difference(self.model)
            if ctx.is_main:
                self.folder.write_ddp(
                    {"world_size": ctx.world, "backend": "nccl" if self.device.type == "cuda" else "gloo",
                     "per_process_batch": self.per_rank, "max_param_diff_across_replicas": diff})


def read_log(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/log.csv`` (one per finished epoch; empty before the first)."""
    return RunFolder(run_dir).read_log()


def read_sessions(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/sessions.jsonl`` (:meth:`lmnet.run_folder.RunFolder.read_sessions`)."""
    return RunFolder(run_dir).read_sessions()


def train(cfg: TrainConfig, resume: bool | str | Path = False, progress: bool = True,
          overrides: dict[str, Any] | None = None,
          replan: Callable[[int, float], int | None] | None = None,
          resume_hint: bool = True) -> Path:
    """Train a model as ``cfg`` says; returns the run folder.

    ``resume``: ``True`` continues the run folder that ``cfg`` names, a path continues that run
    folder; either way the run's own ``config.json`` is used, except for the keys in
    :data:`RESUME_OVERRIDABLE` given in ``overrides``.

    The run folder gets ``config.json``, ``split.json``, ``env.json``, ``log.csv``, TensorBoard
    events in ``tb/``, ``checkpoint_last.pt`` (every epoch) and ``checkpoint_best.pt`` (best
    validation ``cfg.select_metric``). Under ``torchrun`` every process runs this function; rank 0
    alone writes files.

    ``replan(epochs_done, seconds_so_far)``, called after each epoch (single process), may return
    a smaller number of epochs (not below ``epochs_done``): the cosine schedule is shortened to
    end there, and the run's config says so (how ``lmnet demo`` keeps its schedule complete on
    a machine slower than measured). ``resume_hint``: print how to continue a run stopped by its
    time budget.
    """
    ctx = DistContext.from_env(cfg.device)
    try:
        return Trainer(cfg, progress=progress, replan=replan, resume_hint=resume_hint,
                       ctx=ctx).fit(resume, overrides)
    finally:
        ctx.close()



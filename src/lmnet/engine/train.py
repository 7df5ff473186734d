"""The training loop: paper recipe, progress bar, CSV + TensorBoard logs, exact resume, DDP."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from lmnet._files import atomic_path, atomic_save, atomic_write_text
from lmnet._version import __version__
from lmnet.config import TrainConfig
from lmnet.data.dataset import SegmentationDataset, load_sample
from lmnet.data.layouts import DatasetError, Sample, discover
from lmnet.data.splits import load_split, make_kfold_split, make_split, save_split
from lmnet.deploy.checkpoint import build_model, load_checkpoint, load_weights
from lmnet.engine.distributed import DistContext, resolve_device
from lmnet.engine.evaluate import evaluate_samples
from lmnet.losses import SegmentationLoss, class_balanced_weights
from lmnet.runtime import ThreadGovernor, cpu_name

__all__ = ["train", "run_folder", "read_log", "step_seconds", "step_memory", "LOG_FIELDS", "RESUME_OVERRIDABLE"]

log = logging.getLogger(__name__)

LOG_FIELDS = ("epoch", "train_size", "train_loss", "val_paper_mdice", "val_fg_dice", "val_fg_iou", "lr",
              "epoch_seconds", "images_per_second", "steps")
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
    for mod in ("monai", "albumentations", "cv2", "PIL"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is not an error here
            info[mod] = None
    try:
        src = Path(__file__).resolve().parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _make_split(cfg: TrainConfig, samples: list[Sample], run_dir: Path, resume: bool) -> dict[str, Any]:
    if cfg.split_file:
        return load_split(cfg.split_file, samples)
    if resume and (run_dir / "split.json").is_file():
        return load_split(run_dir / "split.json", samples)
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
    """Measured seconds of one optimiser step of ``cfg`` (``grad_accum`` micro-batches: forward,
    backward, AdamW) at ``size`` (default ``cfg.image_size``) on random data: the median of three
    steps after a warm-up step. For planning: epochs that fit a budget, a matrix's estimated time.

    ``probe_batch``: time micro-batches of at most this many images and scale to the recipe's
    micro-batch (the time of these convolutions grows in proportion to the batch), so that an
    estimate never needs the memory of a full micro-batch."""
    size = size or cfg.image_size
    model = build_model(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = SegmentationLoss(torch.ones(max(2, cfg.n_classes)), cfg.dice_weight, cfg.n_classes)
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    timed = min(micro, probe_batch) if probe_batch else micro
    x = torch.randn(timed, cfg.in_channels, size, size)
    y = torch.randint(0, 2, (timed, size, size))
    times = []
    for _ in range(4):  # one warm-up step, then the median of three
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])) * cfg.grad_accum * micro / timed


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


class _GracefulStop:
    """The first Ctrl-C (or SIGTERM, or SIGHUP: a closed terminal, a job killed at the end of a
    session) asks the loop to stop after the current step, which is then saved; a second one
    interrupts at once. A signal the process ignores (SIGHUP under ``nohup``) stays ignored."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if not (enabled and threading.current_thread() is threading.main_thread()):
            return
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        for sig in self._previous:  # a second signal acts as it would without us
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: stopping after this step to save it (Ctrl-C again to stop at once, "
              "losing the current epoch's progress)", file=sys.stderr)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


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
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
        saved = json.loads((run_dir / "config.json").read_text())
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
    last = run_dir / "checkpoint_last.pt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist")
        saved = json.loads((run_dir / "config.json").read_text())
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


def read_log(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/log.csv`` (one per finished epoch; empty before the first)."""
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_sessions(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/sessions.jsonl``: when, where and at which commit each part of a
    run ran (one line per call of :func:`train` on the run)."""
    path = Path(run_dir) / "sessions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        return _train(cfg, resume, progress, ctx, overrides or {}, replan, resume_hint)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, resume: bool | str | Path, progress: bool, ctx: DistContext,
           overrides: dict[str, Any], replan: Callable[[int, float], int | None] | None = None,
           resume_hint: bool = True) -> Path:
    cfg, fmt, samples, run_dir = _prepare_run(cfg, resume, overrides)
    resume = bool(resume)
    device = resolve_device(cfg.device, ctx.local_rank)
    # a resumed run reads its checkpoint before anything is written: a failed command changes nothing
    ckpt = load_checkpoint(run_dir / "checkpoint_last.pt", map_location=device) if resume else None
    if cfg.batch_size % (ctx.world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                         f"= {ctx.world} x {cfg.grad_accum}")
    _seed_everything(cfg.seed)
    split = _make_split(cfg, samples, run_dir, resume)
    by_name = {s.name: s for s in samples}
    train_samples = [by_name[n] for n in split["train"]]
    val_samples = [by_name[n] for n in split["val"]]
    if not train_samples or not val_samples:
        raise ValueError(f"the split has {len(train_samples)} training and {len(val_samples)} "
                         "validation images; both need at least one (check split_ratios)")
    _check_readable([by_name[n] for n in split.get("test", [])], cfg.in_channels)  # train/val: below
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        save_split({**split, "format": fmt, "data": str(cfg.data)}, run_dir / "split.json")
        env = _versions()
        atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
        with (run_dir / "sessions.jsonl").open("a") as fh:  # where and when each part of a run ran
            done = 0 if ckpt is None else int(ckpt["epoch"]) + 1
            fh.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                 "epochs_done": done, "cpu": env["cpu"], "threads": env["threads"],
                                 "cuda": env["cuda"], "git_commit": env["git_commit"]}) + "\n")
    show = progress and ctx.is_main

    train_ds = SegmentationDataset(train_samples, cfg.image_size, True, cfg.in_channels, cfg.mean,
                                   cfg.std, cfg.seed, progress=show)
    val_ds = SegmentationDataset(val_samples, cfg.image_size, False, cfg.in_channels, cfg.mean,
                                 cfg.std, progress=show)
    lesion = np.mean([m.mean() for _, m in train_ds.cache]) * cfg.image_size**2
    weights = class_balanced_weights([cfg.image_size**2 - lesion, lesion], cfg.cb_beta)
    criterion = SegmentationLoss(weights, cfg.dice_weight, cfg.n_classes).to(device)

    per_rank = cfg.batch_size // ctx.world
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed)

    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    fp16 = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    start_epoch, best, best_epoch = 0, -math.inf, -1
    partial: dict[str, Any] | None = None  # progress inside an epoch that a stop cut short
    if ckpt is not None:
        load_weights(model, ckpt["model"], run_dir / "checkpoint_last.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.T_max = cfg.epochs
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["best_epoch"]
        partial = ckpt.get("partial")
        if partial is not None:
            start_epoch = partial["epoch"]
        _set_rng_state(ckpt["rng"])
        if start_epoch >= cfg.epochs:
            log.info("run already finished %d of %d epochs", start_epoch, cfg.epochs)
    net = DistributedDataParallel(model) if ctx.world > 1 else model
    if fp16:
        autocast = torch.autocast("cuda", dtype=torch.float16)
    elif cfg.bf16:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch)
        log_path = run_dir / "log.csv"
        if not resume or not log_path.exists():
            with log_path.open("w", newline="") as fh:
                csv.writer(fh).writerow(LOG_FIELDS)
        else:  # drop rows of epochs after the checkpoint (a crash mid-epoch leaves none, but be safe)
            with log_path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            with atomic_path(log_path) as tmp, tmp.open("w", newline="") as fh:  # whole or not at all
                w = csv.DictWriter(fh, LOG_FIELDS)
                w.writeheader()
                w.writerows(r for r in rows if int(r["epoch"]) < start_epoch + 1)

    def save(epoch: int, val: dict[str, Any] | None, cut: dict[str, Any] | None = None) -> dict[str, Any]:
        """``checkpoint_last.pt`` after 0-based ``epoch``; ``cut``: steps done inside the next one."""
        state = {"config": cfg.to_dict(), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "best_score": best,
                 "best_epoch": best_epoch, "rng": _rng_state(), "val": val, "format": fmt,
                 "partial": cut}
        _atomic_save(state, run_dir / "checkpoint_last.pt")
        return state

    t_run = time.perf_counter()
    budget_s = cfg.time_budget * 60 if cfg.time_budget else None
    governor = ThreadGovernor(enabled=None if ctx.world == 1 and device.type == "cpu" else False)
    stop = _GracefulStop(enabled=ctx.is_main and ctx.world == 1)
    epoch, steps, stop_reason = start_epoch, 0, None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            train_ds.set_output_size(cfg.train_size(epoch))
            done = partial if partial is not None and partial["epoch"] == epoch else None
            steps, seen, loss_sum, prior_s = ((done["steps"], done["seen"], done["loss_sum"], done["seconds"])
                                              if done else (0, 0, 0.0, 0.0))
            order = list(iter(sampler))[steps * per_rank:]  # a cut epoch goes on where it stopped
            # its own generator: a loader draws a seed when iterated, which must not move the global
            # RNG (dropout's), or a resumed epoch would differ from an uninterrupted one
            loader = DataLoader(train_ds, batch_size=per_rank, sampler=order, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            net.train()
            t0 = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} @{cfg.train_size(epoch)}px",
                       unit="batch", disable=not show, dynamic_ncols=True, initial=steps,
                       total=steps + len(loader))
            for x, y, _ in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                parts = [r for r in range(cfg.grad_accum) if r < len(x)]
                step_loss = 0.0
                for r in parts:
                    sync = contextlib.nullcontext() if (r == parts[-1] or ctx.world == 1) else net.no_sync()
                    with sync:
                        with autocast:
                            loss = criterion(net(x[r::cfg.grad_accum]), y[r::cfg.grad_accum]) / len(parts)
                        scaler.scale(loss).backward()
                    step_loss += float(loss.detach())
                scaler.step(optimizer)
                scaler.update()
                steps += 1
                changed = governor.update()
                if changed is not None and show:
                    tqdm.write(_threads_note(changed, governor))
                seen += len(x) * ctx.world
                loss_sum += step_loss
                rate = (seen - (done["seen"] if done else 0)) / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.1f}")
                if budget_s is not None and time.perf_counter() - t_run > budget_s:
                    stop_reason = f"time budget of {cfg.time_budget} min reached"
                elif stop.requested:
                    stop_reason = "interrupted"
                if ctx.world > 1 and budget_s is not None and _any_rank(stop_reason is not None, device):
                    stop_reason = stop_reason or f"time budget of {cfg.time_budget} min reached"
                if stop_reason:
                    break
            bar.close()
            epoch_s = prior_s + time.perf_counter() - t0
            total_steps = math.ceil(len(sampler) / per_rank)
            if steps < total_steps:  # cut short: keep its progress, resume goes on from this step
                if ctx.is_main:
                    save(epoch - 1, None, {"epoch": epoch, "steps": steps, "seen": seen,
                                           "loss_sum": loss_sum, "seconds": epoch_s})
                break
            scheduler.step()
            if ctx.is_main:
                ev = evaluate_samples(model, val_samples, cfg, "resized", boundary=False,
                                      dataset=val_ds, batch_size=max(1, per_rank))
                val = ev.aggregate()["all"]
                row = {"epoch": epoch + 1, "train_size": cfg.train_size(epoch),
                       "train_loss": loss_sum / max(steps, 1),
                       "val_paper_mdice": val["paper_mdice"], "val_fg_dice": val["fg_dice_mean"],
                       "val_fg_iou": val["fg_iou_mean"], "lr": optimizer.param_groups[0]["lr"],
                       "epoch_seconds": round(epoch_s, 2), "images_per_second": round(seen / epoch_s, 3),
                       "steps": steps}
                with (run_dir / "log.csv").open("a", newline="") as fh:
                    csv.DictWriter(fh, LOG_FIELDS).writerow(row)
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
                score = val.get(cfg.select_metric.removeprefix("val_"))
                if score is None:
                    raise ValueError(f"select_metric {cfg.select_metric!r} is not a validation metric")
                if score > best:
                    best, best_epoch = score, epoch
                    _atomic_save(save(epoch, val), run_dir / "checkpoint_best.pt")
                else:
                    save(epoch, val)
                remaining = (time.perf_counter() - t_run) / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1)
                if show:
                    tqdm.write(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  val mDice(paper) "
                               f"{val['paper_mdice']:.4f}  val Dice(fg) {val['fg_dice_mean']:.4f}  "
                               f"{epoch_s:.0f} s  ({row['images_per_second']:.2f} img/s)  "
                               f"run ETA {remaining / 60:.1f} min")
            ctx.barrier()
            if stop_reason:
                break
            if replan is not None and ctx.world == 1 and epoch + 1 < cfg.epochs:
                new = replan(epoch + 1, time.perf_counter() - t_run)
                if new is not None and epoch + 1 <= new < cfg.epochs:
                    log.info("re-planned: %d epochs instead of %d", new, cfg.epochs)
                    cfg = cfg.replace(epochs=new)
                    scheduler.T_max = new  # the cosine now ends at the new last epoch
                    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
                    save(epoch, val)  # the checkpoint's config says it too
            if epoch + 1 >= cfg.epochs:  # (the range above was made before any re-plan)
                break
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
    if stop_reason and ctx.is_main:
        where = (f"after step {steps} of epoch {epoch + 1}" if steps < math.ceil(len(sampler) / per_rank)
                 else f"after epoch {epoch + 1}")
        msg = (f"{stop_reason} {where}; checkpoint_last.pt holds everything up to there. "
               f"Continue with: lmnet train --resume {run_dir}")
        if (show and resume_hint) or stop_reason == "interrupted":
            print(msg, file=sys.stderr)
        if stop_reason == "interrupted":
            raise KeyboardInterrupt
    if ctx.world > 1:
        diff = _replica_difference(model)
        if ctx.is_main:
            (run_dir / "ddp.json").write_text(json.dumps(
                {"world_size": ctx.world, "backend": "nccl" if device.type == "cuda" else "gloo",
                 "per_process_batch": per_rank, "max_param_diff_across_replicas": diff}, indent=2) + "\n")
    return run_dir

"""The model card (``README.md``) of a pretrained folder made from a trained run: data and its
terms, split, recipe, training time and machine, test metrics in both conventions as
``lmnet evaluate`` measured them (with the command), the validation curve, and plain limits. Every
number is read from the run folder; nothing is typed in by hand."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmnet.config import TrainConfig
from lmnet.deploy.checkpoint import load_checkpoint, resolve_checkpoint
from lmnet.deploy.loading import stored_split
from lmnet.deploy.pretrained import export_pretrained
from lmnet.engine.figures import plot_curves
from lmnet.engine.train import read_log, read_sessions
from lmnet.run_folder import RunFolder

__all__ = ["DATASETS", "model_card", "export_with_card"]

CURVE_NAME = "validation_curve.png"
_METRIC_NAMES = {"paper_mdice": "mDice (paper convention)", "fg_dice": "Dice (foreground)"}

#: What a card says about a dataset it knows: name, what it is, citation, terms, limits.
DATASETS: dict[str, dict[str, str]] = {
    "kvasir": {
        "name": "Kvasir-SEG",
        "what": "1,000 colonoscopy images of polyps with pixel masks, 332 x 487 to 1920 x 1072 "
                "pixels, from one Norwegian health trust's endoscopy unit (Vestre Viken, as its "
                "authors describe it)",
        "citation": "D. Jha et al., \"Kvasir-SEG: A Segmented Polyp Dataset\", MMM 2020, "
                    "doi:10.1007/978-3-030-37734-2_37",
        "terms": "its authors allow use for research and education without prior permission and "
                 "ask that the paper be cited; commercial use needs their permission. These weights "
                 "are derived from it: the same terms apply to them.",
        "limits": "Trained on one centre's colonoscopy images: other endoscopes, hospitals, "
                  "bowel preparations or image processing can lower its accuracy without warning. "
                  "Every Kvasir-SEG image holds at least one polyp, so the model has not learned "
                  "to say 'no polyp'; expect false positives on normal mucosa.",
    },
}


def _log(run: Path) -> list[dict[str, str]]:
    return read_log(run)


def _metrics_rows(run: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """``(grid, command, metrics)`` of the run's test evaluations, when ``lmnet evaluate`` wrote them."""
    rows = []
    for grid, flag in (("resized", ""), ("original", " --grid original")):
        path = RunFolder(run).eval_dir("test", grid) / "metrics.json"
        if path.is_file():
            rows.append((grid, f"lmnet evaluate {run.name} --split test{flag}",
                         json.loads(path.read_text())["all"]))
    return rows


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.1f}"


#: Measured test-time augmentation and clean-up of a run, if kept in the run folder:
#: ``python benchmarks/bench_postprocess.py --run RUN --out RUN/postprocess.json``.
POSTPROCESS_NAME = "postprocess.json"


def postprocess_section(path: str | Path) -> list[str]:
    """The card's lines on what ``--tta`` and the clean-up options did to the test scores and
    what they cost, from the JSON of ``benchmarks/bench_postprocess.py``; none if it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    if not rows:
        return []
    lines = ["## Test-time augmentation and clean-up", "",
             f"The same {rows[0].get('n_images', '')} test images scored by `lmnet evaluate ... "
             "SETTING` (grid " + str(data.get("grid", "resized")) + "; engine "
             + str(data.get("engine", "torch")) + "; machine: "
             + str(data.get("machine", {}).get("cpu", "?")) + "), time relative to no setting. "
             f"Command: `{data.get('command', '')}`.", "",
             "| setting | Dice (fg) | change | mDice (paper) | HD95 (px) | time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['fg_dice_mean']:.2f} | {r['dice_change']:+.2f} | "
                     f"{r['paper_mdice']:.2f} | {r['hd95_mean']:.1f} | {r['time_x']:.2f}x |")
    lines.append("")
    return lines


def _sizes(cfg: TrainConfig) -> str:
    if cfg.progressive_size and cfg.progressive_epochs:
        return (f"epochs 1-{cfg.progressive_epochs} at {cfg.progressive_size} x "
                f"{cfg.progressive_size} (progressive resizing), epochs "
                f"{cfg.progressive_epochs + 1}-{cfg.epochs} at {cfg.image_size} x {cfg.image_size}")
    return f"{cfg.image_size} x {cfg.image_size} throughout"


def _schedule(cfg: TrainConfig) -> str:
    return (f"AdamW, lr {cfg.lr}, weight decay {cfg.weight_decay}, cosine schedule over "
            f"{cfg.epochs} epochs to {cfg.min_lr}; batch {cfg.batch_size}"
            f"{f' ({cfg.grad_accum} micro-batches)' if cfg.grad_accum > 1 else ''}")


def _source_stages(init: dict[str, Any]) -> list[str]:
    """The stage lines (``**Stage k** ...``) of the starting weights' own card, if it has any."""
    return [line for line in init.get("card_recipe", []) if line.startswith("**Stage ")]


def earlier_stage_count(init: dict[str, Any] | None) -> int:
    """How many stages trained the weights a run started from: 0 without ``init.json``, 1 for
    weights trained in one run, more for weights that were themselves a warm restart (their own
    card lists their stages)."""
    if not init:
        return 0
    return max(len(_source_stages(init)), 1)


def init_section(init: dict[str, Any] | None) -> list[str]:
    """The stages before this run, for a run that started from trained weights (``init.json``),
    and this run's stage line. Weights that were themselves a warm restart bring their earlier
    stages from their own card; their last stage is described from their training config."""
    if not init:
        return []
    src = TrainConfig.from_dict(init["train_config"])
    name = Path(init["source"]).name or init["source"]
    done = f", {init['epochs_done']} of them trained" if "epochs_done" in init else ""
    n = earlier_stage_count(init)
    if n == 1:
        lines = [f"- **Stage 1** (the starting weights): `{name}`, a {init['kind']}, trained for "
                 f"{src.epochs} epochs{done}: {_sizes(src)}; {_schedule(src)}."]
    else:
        lines = ["- " + re.sub(r"^\*\*Stage \d+\*\*( \([^)]*\))?",
                               f"**Stage {k}** (from `{name}`'s own card)", line)
                 for k, line in enumerate(_source_stages(init)[:-1], start=1)]
        lines.append(f"- **Stage {n}** (the starting weights): `{name}`, a {init['kind']}, a warm "
                     f"restart of stage {n - 1}"
                     f"{' in deployed form' if src.deployed_form else ''}, trained for "
                     f"{src.epochs} epochs{done}: {_sizes(src)}; {_schedule(src)}.")
    form = init["form"]
    lines.append(
        f"- **Stage {n + 1}** (this run): a warm restart from those weights ({form} form"
        f"{': the re-parameterised network, without batch normalisation, is what trains' if form == 'deployed' else ''}) "
        "with a new schedule, as follows.")
    return lines


def earlier_time_and_machine(init: dict[str, Any] | None) -> list[str]:
    """The starting weights' wall-clock and machine lines from their own card, each saying which
    stage it is about (lines that already name a stage are kept as they are)."""
    n = earlier_stage_count(init)
    return [line if line.startswith("Stage ") else f"Stage {n}, from its own card: {line}"
            for line in (init or {}).get("time_and_machine", [])]


def _stage_note(init: dict[str, Any] | None) -> str:
    """What the card's first time line says of the stages: none for a run from scratch."""
    if not init:
        return ""
    n = earlier_stage_count(init)
    below = "stage 1 below" if n == 1 else "earlier stages below"
    if init.get("time_and_machine"):
        return f" (stage {n + 1}; {below})"
    return f" (stage {n + 1}; the time and machine of stage {n} are in its own card)"


def model_card(run: str | Path, title: str | None = None, curve: bool = True,
               load_name: str = "PATH") -> str:
    """The card of ``run``'s best checkpoint (see the module's docstring); ``load_name`` is what
    users pass to ``lmnet.from_pretrained`` (a shipped name, a folder or a Hub id)."""
    ckpt_path = resolve_checkpoint(run)
    run = ckpt_path.parent
    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    log, sessions = _log(run), read_sessions(run)
    split = stored_split(ckpt_path) or {}
    data = DATASETS.get(cfg.format or split.get("format") or "", {})  # the format found, if detected
    data_name = data.get("name", Path(cfg.data).name or "the training data")
    title = title or f"LM-Net trained on {data_name}"
    hours = sum(float(r["epoch_seconds"]) for r in log) / 3600 if log else 0.0
    epoch_done = len(log)
    best_epoch = int(ckpt.get("best_epoch", ckpt.get("epoch", -1))) + 1
    best_row = log[best_epoch - 1] if 0 < best_epoch <= len(log) else {}
    cpus = sorted({s["cpu"] for s in sessions if s.get("cpu")})
    env = RunFolder(run).read_env()
    machine = ", ".join(cpus) or env.get("cpu") or env.get("platform", "not recorded")
    threads = env.get("threads")
    sizes = _sizes(cfg)
    init = RunFolder(run).read_init()
    earlier = earlier_stage_count(init)
    if earlier == 1:
        after = f" (after stage 1's {TrainConfig.from_dict(init['train_config']).epochs})"
    else:
        after = f" (after the {earlier} earlier stages above)" if earlier else ""
    start = (f"starting from the weights of stage {earlier}" if init
             else "the authors' initialisation")
    lines = [
        "---",
        "library_name: lmnet",
        "pipeline_tag: image-segmentation",
        "tags: [medical-imaging, segmentation, lm-net]",
        "license: other",
        "---",
        "",
        f"# {title}",
        "",
        f"LM-Net ({cfg.model}{', ' + json.dumps(cfg.model_args) if cfg.model_args else ''}) "
        f"for binary lesion segmentation, {cfg.in_channels}-channel input, trained with lmnet's "
        "own `lmnet train` and exported with `lmnet export RUN --format pretrained`. "
        "**A research model, not a medical device**: not for diagnosis or treatment decisions.",
        "",
        "```python",
        "import lmnet",
        f"model = lmnet.from_pretrained(\"{load_name}\")  # a shipped name, a folder or a Hub id",
        "```",
        "",
        f"`lmnet predict --weights {load_name} images/ --out predictions/` writes masks, overlays "
        f"and lesion areas; `lmnet evaluate --weights {load_name} --data PATH` scores it on the "
        "split below.",
        "",
        "## Data",
        "",
        f"- **{data_name}**" + (f": {data['what']}." if data.get("what") else "."),
    ]
    if data.get("citation"):
        lines.append(f"- Cite: {data['citation']}.")
    if data.get("terms"):
        lines.append(f"- Terms: {data['terms']}")
    if split:
        counts = ", ".join(f"{k} {len(split.get(k, []))}" for k in ("train", "val", "test"))
        how = (f"seeded random split {cfg.split_ratios} with seed {cfg.split_rng_seed}" if not cfg.split_file
               else f"split from {Path(cfg.split_file).name}")
        lines.append(f"- Split: {how} ({counts} images); the exact lists are in `config.json` "
                     "under `split`, so that anyone can score it on the same test images.")
    lines += [
        "",
        "## Recipe",
        "",
        *init_section(init),
        f"- Input {cfg.image_size} x {cfg.image_size}, RGB scaled to [0, 1] and normalised with "
        f"mean {cfg.mean}, std {cfg.std}; lesion = softmax class 1 > 0.5.",
        f"- Training sizes: {sizes}; validation at {cfg.image_size} x {cfg.image_size} after "
        "every epoch.",
        f"- {_schedule(cfg)}; loss: "
        f"class-balanced cross-entropy (beta {cfg.cb_beta}) + {cfg.dice_weight} x soft Dice; "
        "the paper's augmentation (shift, scale, flips, rotation, blur, colour jitter); "
        f"{start}; "
        f"seed {cfg.seed}; channels-last "
        f"{'on' if cfg.channels_last else 'off'}, fp32.",
        f"- The checkpoint with the best validation "
        f"{_METRIC_NAMES.get(cfg.select_metric, cfg.select_metric)} is shipped: epoch "
        f"{best_epoch} of {epoch_done}" + (
            f" (validation Dice, foreground: {_pct(best_row.get('val_fg_dice'))} %; mDice, paper "
            f"convention: {_pct(best_row.get('val_paper_mdice'))} %)." if best_row else "."),
        "- The whole training config is in `config.json` under `train_config`.",
        "",
        "## Training time and machine",
        "",
        f"- {epoch_done} of {cfg.epochs} epochs" + _stage_note(init) +
        f", {hours:.1f} hours of training (sum of the logged "
        "epoch times, validation included; start-up and pauses between sessions not counted)"
        + (f", in {len(sessions)} session{'s (a start and `lmnet train --resume`s)' if len(sessions) > 1 else ''}."
           if sessions else "."),
        f"- Machine: {machine}" + (f", {threads} threads" if threads else "") +
        (f"; CUDA {env['cuda']}" if env.get("cuda") else ", CPU only") + ".",
        *(f"- {line}" for line in earlier_time_and_machine(init)),
        "",
    ]
    metrics = _metrics_rows(run)
    lines += ["## Test results", ""]
    if metrics:
        lines += [
            f"Measured by `lmnet evaluate` on the {len(split.get('test', [])) or ''} test images "
            "(never seen in training or model selection). Dice and IoU (foreground): the lesion, "
            "mean over images, the number users should read. mDice and mIoU (paper): the mean "
            "over {background, lesion} of Dice and IoU pooled over the set, the LM-Net paper's "
            "convention (higher, since the background is easy). 'resized': scored at "
            f"{cfg.image_size} x {cfg.image_size} as the paper; 'original': masks resized back to "
            "each image's own size.",
            "",
            "| scored at | Dice (fg) | IoU (fg) | mDice (paper) | mIoU (paper) | Precision | "
            "Recall | HD95 (px) | command |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for grid, command, m in metrics:
            hd95 = m.get("hd95_mean")
            lines.append(
                f"| {grid} | {_pct(m.get('fg_dice_mean'))} | {_pct(m.get('fg_iou_mean'))} | "
                f"{_pct(m.get('paper_mdice'))} | {_pct(m.get('paper_miou'))} | "
                f"{_pct(m.get('precision_pooled'))} | {_pct(m.get('recall_pooled'))} | "
                f"{'' if hd95 is None else f'{float(hd95):.1f}'} | `{command}` |")
        lines.append("")
    else:
        lines += ["Not measured yet: run `lmnet evaluate RUN --split test` (and `--grid original`)"
                  " before exporting.", ""]
    lines += postprocess_section(run / POSTPROCESS_NAME)
    if curve and log:
        lines += ["## Validation curve", "",
                  f"![validation Dice per epoch]({CURVE_NAME})", ""]
    lines += ["## Limits", ""]
    if data.get("limits"):
        lines.append(f"- {data['limits']}")
    lines += [
        f"- Trained for {epoch_done} epochs"
        + after + " at a CPU budget, against the paper's 200 at 256 x 256 "
        "on a GPU: a longer schedule is likely to do better.",
        "- Images are squeezed to a square of the input size whatever their aspect ratio, as in "
        "training; very small lesions lose detail at that size.",
        "- A research model, not a medical device: a clinician must check every output.",
        "",
    ]
    return "\n".join(lines)


def export_with_card(run: str | Path, out: str | Path, title: str | None = None) -> Path:
    """The pretrained folder of ``run`` (:func:`~lmnet.deploy.pretrained.export_pretrained`) with
    :func:`model_card` as its README.md and the validation curve as a PNG beside it."""
    run_dir = resolve_checkpoint(run).parent
    out = Path(out)
    folder = export_pretrained(run, out, card=model_card(run, title, load_name=out.name))
    if _log(run_dir):
        plot_curves({"LM-Net": [run_dir]}, folder / CURVE_NAME, metric="val_fg_dice",
                    title="Validation Dice (foreground, mean over images) per epoch")
    return folder

"""The deployed model in every CPU engine, and ``lmnet predict`` on a folder (run by hand, not in CI).

    python benchmarks/bench_deploy.py [--checkpoint RUN | --weights kvasir] [--int8 m_int8.xml]
        [--batches 1 8] [--repeats 12] [--folder DATA/images --images 100 --base-rev REV]
        [--out benchmarks/results/deploy.json]

Part 1, engines (interleaved rounds per batch size; ms per image, images per second): LM-Net
deployed in PyTorch channels-last fp32 (the reference of the ratios), PyTorch + bf16 autocast, ONNX
Runtime, OpenVINO fp32 (compiled for the input size; and with height and width left dynamic, as
before), OpenVINO with the bf16 hint, OpenVINO int8 (the IR of ``--int8``, from
``lmnet export --format openvino --int8``; without it, NNCF on 16 random images, timing only), and
MONAI BasicUNet in the same engines. The PyTorch and OpenVINO rows of LM-Net run lmnet's native
attention kernel where it loads (in OpenVINO as one fused node per attention), as ``lmnet predict``
does; the "stock attention" rows compute it as lmnet did before that kernel (PyTorch's whole-map
operations; OpenVINO's own nodes). Weights do not change speed, except which layers an
accuracy-controlled int8 IR keeps in fp32: pass the real one.

Part 2, ``lmnet predict`` on ``--images`` images of ``--folder`` (whole commands as a user runs
them: start-up, loading, decoding, writing included; wall-clock of the process): this checkout with
``--engine torch`` one image at a time, with the default (``--engine auto``, its probe cached by a
first run, whose time is reported apart), with OpenVINO at batch 8, the int8 IR; and ``--base-rev``
(a git revision, checked out into a temporary worktree) as it was, for "today's images per second".
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import interleaved_times, machine, report, scratch_dir, summarize_times  # noqa: E402

import lmnet  # noqa: E402
from lmnet.config import TrainConfig  # noqa: E402
from lmnet.deploy.backends import make_runner, openvino_runner, precision_context  # noqa: E402
from lmnet.deploy.loading import load_model  # noqa: E402
from lmnet.layers import neighborhood_attention as na  # noqa: E402
from lmnet.runtime import keep_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engine_rows(model: torch.nn.Module, cfg: TrainConfig, label: str, int8: str | None,
                threads: int) -> dict[str, callable]:
    """name -> factory of ``run(x_numpy)``."""
    def torch_run(bf16: bool = False, native_attention: bool = True):
        m = model.to(memory_format=torch.channels_last)

        def run(x):
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            before, na.NATIVE_FORWARD = na.NATIVE_FORWARD, native_attention
            try:
                with torch.inference_mode(), precision_context("bf16" if bf16 else "fp32"):
                    return m(xt)
            finally:
                na.NATIVE_FORWARD = before
        return run

    def int8_run():
        if int8:
            return openvino_runner(int8, threads=threads)
        from lmnet.deploy.convert import convert_to_openvino
        from lmnet.deploy.quantize import quantize_openvino

        rng = np.random.default_rng(0)
        data = [rng.standard_normal((1, cfg.in_channels, cfg.image_size, cfg.image_size),
                                    dtype=np.float32) for _ in range(16)]
        ov_model = quantize_openvino(convert_to_openvino(model, cfg.in_channels, cfg.image_size), data)
        import openvino as ov

        ov_model.reshape({0: ov.PartialShape([-1, cfg.in_channels, cfg.image_size, cfg.image_size])})
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        return lambda x: compiled(x)[0]

    rows = {
        f"{label}, PyTorch channels-last fp32": torch_run,
        f"{label}, PyTorch channels-last + bf16 autocast": lambda: torch_run(True),
        f"{label}, ONNX Runtime": lambda: make_runner(model, cfg, "onnx", threads=threads),
        f"{label}, OpenVINO fp32": lambda: make_runner(model, cfg, "openvino", "fp32", threads),
        f"{label}, OpenVINO bf16 hint": lambda: make_runner(model, cfg, "openvino", "bf16", threads),
    }
    if label == "lmnet":  # as before the native attention kernel (lmnet at 2fefbea)
        rows[f"{label}, PyTorch channels-last fp32, stock attention"] = lambda: torch_run(
            native_attention=False)
        for precision in ("fp32", "bf16"):
            rows[f"{label}, OpenVINO {precision}, stock attention"] = (
                lambda p=precision: openvino_runner(model, cfg.in_channels, cfg.image_size, p,
                                                    threads, fused_attention=False))
        rows[f"{label}, OpenVINO fp32, dynamic H x W"] = lambda: openvino_runner(
            model, cfg.in_channels, cfg.image_size, "fp32", threads, fixed_size=False)
        rows[f"{label}, OpenVINO int8" + ("" if int8 else " (random calibration)")] = int8_run
    return rows


def bench_engines(args: argparse.Namespace, threads: int) -> list[dict]:
    model, cfg = load_model(args.checkpoint, args.weights) if (args.checkpoint or args.weights) \
        else (lmnet.deploy(lmnet.create_model("lmnet").eval()), TrainConfig(data="", image_size=args.size))
    unet = lmnet.deploy(lmnet.create_model("basic_unet").eval())
    factories = {**engine_rows(model, cfg, "lmnet", args.int8, threads),
                 **engine_rows(unet, cfg, "basic_unet", None, threads)}
    runners = {}
    for name, make in factories.items():
        try:
            runners[name] = make()
        except Exception as err:  # noqa: BLE001 - a failing row is reported, the rest go on
            print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr)
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size),
                                                     dtype=np.float32)
        times = interleaved_times({n: (lambda r=r: r(x)) for n, r in runners.items()},
                                  args.repeats)
        ref = np.median(times["lmnet, PyTorch channels-last fp32"])
        best_unet = min(np.median(t) for n, t in times.items() if n.startswith("basic_unet"))
        for name, t in times.items():
            rows.append({"name": name, "batch": batch, **summarize_times(t, batch),
                         "speed-up vs lmnet PyTorch": round(ref / np.median(t), 2),
                         "x best BasicUNet": round(np.median(t) / best_unet, 2)})
        print(f"batch {batch} done", file=sys.stderr)
    return rows


def bench_predict(args: argparse.Namespace, threads: int) -> list[dict]:
    scratch = Path(scratch_dir())
    folder = scratch / "images"
    folder.mkdir()
    for p in sorted(Path(args.folder).iterdir())[: args.images]:
        shutil.copy(p, folder / p.name)
    n = len(list(folder.iterdir()))
    env = {**os.environ, "LMNET_CACHE_DIR": str(scratch / "cache")}
    # (source tree, positionals before the images, options)
    model, options = ([], ["--weights", args.weights]) if args.weights else ([str(args.checkpoint)], [])
    src = str(ROOT / "src")
    commands = {
        "this checkout, --engine torch --batch-size 1": (src, model, options + ["--engine", "torch"]),
        "this checkout, default (--engine auto)": (src, model, options),
        "this checkout, --engine openvino --batch-size 8": (
            src, model, options + ["--engine", "openvino", "--batch-size", "8"]),
    }
    if args.int8:
        commands["this checkout, int8 IR, --batch-size 8"] = (src, [args.int8], ["--batch-size", "8"])
    if args.base_rev:
        tree = scratch / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        args.base_rev], check=True, capture_output=True)
        commands[f"{args.base_rev}, lmnet predict as it was"] = (str(tree / "src"), model, options)

    def run(name: str) -> float:
        path, positionals, opts = commands[name]
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lmnet.cli.main", "predict", *positionals,
                               str(folder), *opts, "--out", str(out), "--quiet", "--threads",
                               str(threads)], env={**env, "PYTHONPATH": path}, capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
        return time.perf_counter() - t

    try:
        first_auto = run("this checkout, default (--engine auto)")  # measures and caches its probe
        wall = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name in commands:
                wall[name].append(run(name))
    finally:
        if args.base_rev:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(scratch / "base")], capture_output=True)
    ref = np.median(wall[f"{args.base_rev}, lmnet predict as it was"]) if args.base_rev else None
    rows = []
    for name, t in wall.items():
        med = float(np.median(t))
        rows.append({"name": f"predict {n} images: {name}", "seconds": round(med, 2),
                     "images_per_second": round(n / med, 2),
                     "vs base": round(ref / med, 2) if ref else "",
                     "runs": len(t)})
    rows.append({"name": f"predict {n} images: first --engine auto run (probe included)",
                 "seconds": round(first_auto, 2), "images_per_second": round(n / first_auto, 2),
                 "vs base": round(ref / first_auto, 2) if ref else "", "runs": 1})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="run folder or checkpoint (default: random)")
    p.add_argument("--weights", default=None, help="a pretrained model instead, e.g. kvasir")
    p.add_argument("--int8", default=None, help="int8 OpenVINO IR from lmnet export --int8")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--folder", default=None, help="images for the lmnet predict rows")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the predict rows")
    p.add_argument("--base-rev", default=None, help="git revision to compare lmnet predict with")
    p.add_argument("--skip-engines", action="store_true")
    p.add_argument("--out", default="benchmarks/results/deploy.json")
    args = p.parse_args()
    keep_freed_memory()
    threads = torch.get_num_threads()
    rows = [] if args.skip_engines else bench_engines(args, threads)
    if args.folder:
        rows += bench_predict(args, threads)
    report(rows, [("name", "name"), ("batch", "batch"), ("ms/img", "ms_per_image_median"),
                  ("IQR", "ms_per_image_iqr"), ("img/s", "images_per_second"),
                  ("vs PyTorch", "speed-up vs lmnet PyTorch"), ("x BasicUNet", "x best BasicUNet"),
                  ("s", "seconds"), ("vs base", "vs base")], args.out, machine(),
           threads=threads)


if __name__ == "__main__":
    main()

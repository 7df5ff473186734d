"""How long loading a data set takes before training or evaluation starts (run by hand, not in
CI): every ``lmnet train``, ``evaluate`` and ``score`` decodes, binarises and resizes each image
and mask once, up front (:class:`lmnet.data.dataset.SegmentationDataset`).

    python benchmarks/bench_data_load.py [--data ../shared/datasets/kvasir-seg] [--count 300]
                                         [--size 256] [--rounds 3] [--before 7d9a540]
                                         [--out benchmarks/results/data_load.json]

Two ways, interleaved in rounds (the first round is a warm-up and not counted): the mask reading
of this checkout and that of git revision ``--before`` (its ``lmnet/data/io.py``, loaded from
git), each inside the same dataset loading. Both must give the same masks (checked).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import machine, report  # noqa: E402

import lmnet.data.dataset as dataset_module  # noqa: E402
from lmnet.data.layouts import discover  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def io_module_at(rev: str):  # noqa: ANN201 - a module
    """``lmnet.data.io`` as it was at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:src/lmnet/data/io.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="lmnet-bench-")) / f"io_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"lmnet_data_io_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "kvasir-seg"))
    ap.add_argument("--count", type=int, default=300, help="samples (the first ones found)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", default="7d9a540", help="git revision to compare with")
    ap.add_argument("--out", default="benchmarks/results/data_load.json")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        ap.error(f"no data set folder at {args.data} (--data)")

    samples = discover(args.data)[1][: args.count]
    masks = [m for s in samples for m in s.masks]
    old = io_module_at(args.before).read_mask  # (path, label_maps) only, no findings
    readers = {"this checkout": dataset_module.read_mask,
               f"before ({args.before})": lambda path, label_maps=None, findings=None:
               old(path, label_maps)}
    for p in masks[:50]:  # the same masks both ways
        a, b = (r(p) for r in readers.values())
        assert np.array_equal(a, b), p

    def load(reader) -> None:  # noqa: ANN001 - the dataset's whole loading with this mask reader
        dataset_module.read_mask = reader
        dataset_module.SegmentationDataset(samples, args.size)

    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds + 1):
        for name, reader in readers.items():
            for what, fn in (("read masks", lambda rd=reader: [rd(p, []) for p in masks]),
                             ("load the data set", lambda rd=reader: load(rd))):
                t = time.perf_counter()
                fn()
                if r:  # round 0: warm-up (file cache, imports)
                    times.setdefault((what, name), []).append(time.perf_counter() - t)
    dataset_module.read_mask = readers["this checkout"]

    rows = []
    for (what, name), ts in times.items():
        before = times[(what, f"before ({args.before})")]
        rows.append({"step": what, "code": name,
                     "ms_per_sample": round(1000 * statistics.median(ts) / len(samples), 2),
                     "seconds": round(statistics.median(ts), 3), "all_seconds": ts,
                     "speedup_vs_before": round(statistics.median(before) / statistics.median(ts), 2)})
    report(rows, [("step", "step"), ("code", "code"), ("ms a sample", "ms_per_sample"),
                  ("seconds (median)", "seconds"), ("x faster than before", "speedup_vs_before")],
           args.out, machine(),
           data=str(args.data), samples=len(samples), masks=len(masks), size=args.size,
           rounds=args.rounds)


if __name__ == "__main__":
    main()

"""How long converting a deployed model for OpenVINO takes (run by hand, not in CI): what
``lmnet predict --backend openvino`` (and its engine probe) pays once per model, and ``lmnet
export --format openvino`` every time.

    python benchmarks/bench_convert.py [--weights kvasir] [--size 256] [--rounds 4]
                                       [--out benchmarks/results/convert.json]

Two ways, interleaved in rounds (the first round is a warm-up and not counted), with OpenVINO's
own operations and with each attention fused into lmnet's node: ``openvino.convert_model`` on the
module (it traces the model and then checks the trace by running it again, as lmnet converted
before) and :func:`lmnet.deploy.convert.convert_to_openvino` (the same trace without the check).
Both give the same graph; the tests compare the converted models' logits with PyTorch's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine, report  # noqa: E402

import lmnet  # noqa: E402


def checked_trace(model: torch.nn.Module, size: int, fused: bool):
    """``convert_model`` on the module itself: lmnet's conversion before this benchmark."""
    import openvino as ov

    from lmnet.deploy.openvino_ops import conversion_extensions

    model = copy.deepcopy(model) if fused else model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return ov.convert_model(model, example_input=torch.randn(1, 3, size, size),
                                extension=conversion_extensions() if fused else None,
                                input=[ov.PartialShape([-1, 3, -1, -1])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", default="kvasir", help="pretrained model (name or folder)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/convert.json")
    args = ap.parse_args()
    from lmnet.deploy.convert import convert_to_openvino

    model = lmnet.deploy(lmnet.from_pretrained(args.weights)).eval()
    ways = {}
    for fused in (False, True):
        graph = "attention fused" if fused else "OpenVINO's operations"
        ways[(graph, "convert_model, trace checked")] = (
            lambda f=fused: checked_trace(model, args.size, f))
        ways[(graph, "lmnet, trace unchecked")] = (
            lambda f=fused: convert_to_openvino(model, 3, args.size, fused_attention=f))
    times: dict = {key: [] for key in ways}
    nodes: dict = {}
    for r in range(args.rounds + 1):
        for key, fn in ways.items():
            t = time.perf_counter()
            converted = fn()
            if r:
                times[key].append(time.perf_counter() - t)
            nodes[key] = len(converted.get_ops())
    rows = []
    for (graph, way), ts in times.items():
        before = statistics.median(times[(graph, "convert_model, trace checked")])
        rows.append({"graph": graph, "way": way, "nodes": nodes[(graph, way)],
                     "s_median": round(statistics.median(ts), 2),
                     "s_each": [round(t, 2) for t in ts],
                     "speedup": round(before / statistics.median(ts), 2)})
    report(rows, [("graph", "graph"), ("way", "way"), ("nodes", "nodes"), ("s, median", "s_median"),
                  ("x", "speedup")], args.out, machine(), weights=args.weights, size=args.size)


if __name__ == "__main__":
    main()

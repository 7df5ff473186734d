"""OpenVINO compiled with the batch free against the batch fixed (run by hand, not in CI).

    python benchmarks/bench_openvino_batch.py --int8 kvasir_int8.xml [--weights kvasir]
        [--repeats 30] [--out benchmarks/results/openvino_batch.json]

The deployed model (fp32, converted as ``lmnet`` converts it) and an int8 IR from ``lmnet export
--int8``, each compiled for ``[?, 3, S, S]`` (batch free) and ``[1, 3, S, S]``, timed at batch 1 in
interleaved rounds; also the largest difference of the int8 logits between the two compilations
(OpenVINO picks other int8 kernels for a static shape).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import interleaved_times, machine, write_json  # noqa: E402

from lmnet.deploy.convert import cached_openvino_model  # noqa: E402
from lmnet.deploy.loading import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--int8", required=True, help="int8 OpenVINO IR (lmnet export --int8)")
    p.add_argument("--weights", default="kvasir", help="pretrained weights for the fp32 rows")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/openvino_batch.json")
    args = p.parse_args()
    import openvino as ov

    threads = torch.get_num_threads()
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}

    def compiled(model, batch):
        model = model.clone()
        model.reshape({model.input(0): ov.PartialShape([batch, 3, args.size, args.size])})
        c = core.compile_model(model, "CPU", config)
        return lambda x: c(x)[0]

    model, _ = load_model(None, args.weights)
    ir = {"int8": core.read_model(args.int8), "fp32": cached_openvino_model(model, 3, args.size)}
    runners = {f"{name} {shape}": compiled(m, batch) for name, m in ir.items()
               for shape, batch in (("batch free", -1), ("batch 1", 1))}
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size), dtype=np.float32)
    diff = float(np.abs(runners["int8 batch free"](x) - runners["int8 batch 1"](x)).max())
    times = interleaved_times({n: (lambda r=r: r(x)) for n, r in runners.items()}, args.repeats)
    rows = []
    for name in ir:
        free, fixed = (statistics.median(times[f"{name} {s}"]) * 1e3 for s in ("batch free", "batch 1"))
        rows.append({"model": name, "batch free ms": round(free, 1), "batch 1 ms": round(fixed, 1),
                     "speed-up": round(free / fixed, 3)})
        print(f"{name}: batch free {free:.1f} ms, batch 1 {fixed:.1f} ms, {free / fixed:.3f}x")
    print(f"int8 logits, batch free vs batch 1: largest difference {diff:.3g}")
    cmd = "python benchmarks/bench_openvino_batch.py " + " ".join(sys.argv[1:])
    write_json(args.out, {"command": cmd, "machine": machine(), "threads": threads,
                          "repeats": args.repeats, "rows": rows, "int8_max_logit_diff": diff})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

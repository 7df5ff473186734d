"""Where the inference time of the deployed LM-Net goes on the CPU (run by hand, not in CI).

    python benchmarks/profile_infer.py [--size 256] [--repeats 10] [--compile-attention]
                                       [--out benchmarks/results/profile.json]

Deployed model, channels-last, fp32 eager, batch 1, freed memory kept (as the lmnet command runs):
- operators: ``torch.profiler`` self CPU time per forward pass, the largest first;
- modules: wall time per forward pass of each top-level module, and of each member of a
  ModuleList (``lfts.3``, ``decoders.0``; forward hooks);
- convolutions: their total time per pass and their share of the multiply-accumulates
  (``torch.utils.flop_counter``);
- attention ops: the computing (non-view) tensor operations of one neighborhood-attention call;
- ONNX Runtime: its own profile of the exported model, time per run by operator type;
- ``--compile-attention``: the full-resolution attention alone, eager against ``torch.compile``;
- ``--openvino [fp32] [bf16] [m_int8.xml]``: OpenVINO's own per-node counters, by executed layer
  type and by model part (the engine ``lmnet predict`` picks here).
It uses only lmnet's public API, so it also profiles an older checkout put first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine, scratch_dir, time_call, write_json  # noqa: E402  (oneDNN cache first)

import lmnet  # noqa: E402
from lmnet.deploy.convert import export_onnx  # noqa: E402
from lmnet.layers import neighborhood_attention_2d  # noqa: E402

VIEW_OPS = {"aten::slice", "aten::select", "aten::reshape", "aten::view", "aten::flatten",
            "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::expand", "aten::numpy_T",
            "aten::t", "aten::transpose", "aten::split", "aten::chunk", "aten::unbind",
            "aten::as_strided", "aten::alias", "aten::contiguous", "aten::narrow"}



def operator_profile(model, x, repeats):
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for _ in range(repeats):
            model(x)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "ms_per_pass": round(e.self_cpu_time_total / repeats / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:12]]


def module_times(model, x, repeats):
    spent, starts = collections.defaultdict(list), {}
    hooks = []
    lists = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    for name, mod in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        top = (name and "." not in name and name not in lists) or parent in lists
        if top:  # stage1, bridge, lfts.3, ...
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: spent[n].append(time.perf_counter() - starts[n])))
    with torch.inference_mode():
        totals = time_call(lambda: model(x), repeats)
    for h in hooks:
        h.remove()
    rows = [{"module": n, "ms_per_pass": round(sum(t) / repeats * 1e3, 2)} for n, t in spent.items()]
    return sorted(rows, key=lambda r: -r["ms_per_pass"]), statistics.median(totals) * 1e3


def convolution_share(model, x, repeats):
    from torch.utils.flop_counter import FlopCounterMode

    spent, starts, hooks = [], {}, []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i: starts.__setitem__(id(m), time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda m, i, o: spent.append(time.perf_counter() - starts[id(m)])))
    with torch.inference_mode():
        time_call(lambda: model(x), repeats, warmup=1)
    for h in hooks:
        h.remove()
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    macs = {str(k): v / 2 for k, v in counter.get_flop_counts()["Global"].items()}
    conv_ms = sum(spent) / repeats * 1e3
    conv_macs = macs.get("aten.convolution", 0.0)
    return {"convolutions": n_convs, "conv_ms_per_pass": round(conv_ms, 2),
            "conv_gmacs": round(conv_macs / 1e9, 3), "total_gmacs": round(sum(macs.values()) / 1e9, 3),
            "conv_gmac_per_s": round(conv_macs / 1e9 / (conv_ms / 1e3), 1)}


def attention_op_count():
    q, k, v = (torch.randn(1, 12, 32, 32) for _ in range(3))
    rpb = torch.randn(12, 5, 5)
    with torch.inference_mode():
        neighborhood_attention_2d(q, k, v, 12, 3, rpb)
        with torch.profiler.profile() as prof:
            neighborhood_attention_2d(q, k, v, 12, 3, rpb)
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    computing = [n for n in top if n not in VIEW_OPS]
    return {"ops_total": len(top), "ops_computing": len(computing),
            "computing_by_op": dict(collections.Counter(computing).most_common())}


def ort_profile(model, size, repeats):
    import onnxruntime as ort

    path = Path(scratch_dir()) / "model.onnx"
    export_onnx(model, path, 3, size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_name("ort_profile"))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, size, size).numpy()
    for _ in range(repeats):
        sess.run(None, {"image": x})
    by_type = collections.Counter()
    for event in json.loads(Path(sess.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
    total = sum(by_type.values())
    return {"ms_per_run": round(total / repeats / 1e3, 2),
            "by_op_type": [{"op": k, "ms_per_run": round(v / repeats / 1e3, 2),
                            "share": round(v / total, 3)} for k, v in by_type.most_common(12)]}


def openvino_profile(model, size, repeats, precision="fp32", xml=None):
    """OpenVINO's own per-node counters (``PERF_COUNT``): time per run by executed layer type, and
    by the part of the model a node comes from (the first two parts of its PyTorch scope name,
    e.g. ``lfts.3`` or ``stage2``)."""
    import openvino as ov

    from lmnet.deploy.convert import convert_to_openvino

    core = ov.Core()
    ov_model = core.read_model(xml) if xml else convert_to_openvino(model, 3, size)
    compiled = core.compile_model(ov_model, "CPU", {
        "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS":
        torch.get_num_threads(), "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]})
    request = compiled.create_infer_request()
    x = torch.randn(1, 3, size, size).numpy()
    for _ in range(3):
        request.infer({0: x})
    by_type, by_part = collections.Counter(), collections.Counter()
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        request.infer({0: x})
        walls.append(time.perf_counter() - t)
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            if us <= 0:
                continue
            kind = f"{info.node_type} ({info.exec_type.split('_')[0]})" if info.exec_type else info.node_type
            by_type[kind] += us
            scope = re.search(r"__module\.(\w+?)(?:\.(\d+))?(?:[./]|$)", info.node_name)
            by_part[".".join(g for g in scope.groups() if g) if scope else "unnamed"] += us
    total = sum(by_type.values())

    def top(counter, key, n=14):
        return [{key: k, "ms_per_run": round(v / repeats / 1e3, 2), "share": round(v / total, 3)}
                for k, v in counter.most_common(n)]
    return {"precision": precision, "ir": xml, "wall_ms_median": round(statistics.median(walls) * 1e3, 2),
            "ms_per_run_counted": round(total / repeats / 1e3, 2),
            "by_layer_type": top(by_type, "layer"), "by_model_part": top(by_part, "part")}


def compiled_attention(size, repeats):
    q, k, v = (torch.randn(1, 12, size, size) for _ in range(3))
    rpb = torch.randn(12, 5, 5)
    compiled = torch.compile(neighborhood_attention_2d, dynamic=False)
    with torch.inference_mode():
        eager = statistics.median(time_call(lambda: neighborhood_attention_2d(q, k, v, 12, 3, rpb),
                                            repeats)) * 1e3
        fused = statistics.median(time_call(lambda: compiled(q, k, v, 12, 3, rpb), repeats)) * 1e3
    return {"eager_ms": round(eager, 2), "compiled_ms": round(fused, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-attention", action="store_true")
    ap.add_argument("--openvino", nargs="*", default=None, metavar="PRECISION_OR_XML",
                    help="also OpenVINO's own profile: fp32, bf16 and/or an IR file (e.g. int8)")
    ap.add_argument("--out", default="benchmarks/results/profile.json")
    args = ap.parse_args()
    try:
        from lmnet.runtime import keep_freed_memory
        kept = keep_freed_memory()
    except ImportError:  # an older checkout
        kept = False
    torch.manual_seed(0)
    model = lmnet.deploy(lmnet.create_model("lmnet")).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        time_call(lambda: model(x), 1, warmup=3)
    result = {"lmnet_file": lmnet.__file__, "freed_memory_kept": kept}
    result["operators"] = operator_profile(model, x, args.repeats)
    result["modules"], result["forward_ms"] = module_times(model, x, args.repeats)
    result["convolutions"] = convolution_share(model, x, args.repeats)
    result["attention_ops"] = attention_op_count()
    result["onnxruntime"] = ort_profile(lmnet.deploy(lmnet.create_model("lmnet")), args.size,
                                        args.repeats)
    if args.compile_attention:
        result["compiled_attention"] = compiled_attention(args.size, args.repeats)
    if args.openvino is not None:
        fresh = lmnet.deploy(lmnet.create_model("lmnet"))
        result["openvino"] = [
            openvino_profile(fresh, args.size, args.repeats, xml=item) if item.endswith(".xml")
            else openvino_profile(fresh, args.size, args.repeats, precision=item)
            for item in (args.openvino or ["fp32"])]

    print(f"lmnet from {result['lmnet_file']}; freed memory kept: {kept}; "
          f"forward {result['forward_ms']:.1f} ms (median, hooks attached)")
    print("\noperators (torch.profiler, self CPU time per pass)")
    for r in result["operators"]:
        print(f"  {r['op']:<40}{r['ms_per_pass']:8.2f} ms {r['share']:7.1%}")
    print("\nmodules (wall time per pass)")
    for r in result["modules"][:10]:
        print(f"  {r['module']:<40}{r['ms_per_pass']:8.2f} ms")
    c = result["convolutions"]
    print(f"\n{c['convolutions']} convolutions: {c['conv_ms_per_pass']} ms per pass, "
          f"{c['conv_gmacs']} of {c['total_gmacs']} G MACs, {c['conv_gmac_per_s']} G MAC/s")
    a = result["attention_ops"]
    print(f"one attention call: {a['ops_computing']} computing tensor ops ({a['ops_total']} with views)")
    o = result["onnxruntime"]
    print(f"\nONNX Runtime profile: {o['ms_per_run']} ms per run")
    for r in o["by_op_type"]:
        print(f"  {r['op']:<40}{r['ms_per_run']:8.2f} ms {r['share']:7.1%}")
    for o in result.get("openvino", []):
        print(f"\nOpenVINO profile ({o['ir'] or o['precision']}): {o['wall_ms_median']} ms per run "
              f"(wall, median), {o['ms_per_run_counted']} ms in its counters")
        for r in o["by_layer_type"]:
            print(f"  {r['layer']:<40}{r['ms_per_run']:8.2f} ms {r['share']:7.1%}")
        print("  by model part:")
        for r in o["by_model_part"]:
            print(f"  {r['part']:<40}{r['ms_per_run']:8.2f} ms {r['share']:7.1%}")
    if "compiled_attention" in result:
        ca = result["compiled_attention"]
        print(f"\nattention at {args.size} x {args.size}, 12 heads: eager {ca['eager_ms']} ms, "
              f"torch.compile {ca['compiled_ms']} ms")
    cmd = "python benchmarks/profile_infer.py " + " ".join(sys.argv[1:])
    write_json(args.out, {"command": cmd.strip(), "machine": machine(), **result})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

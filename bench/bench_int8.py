"""ONNX Runtime dynamic int8 recipes side by side: max |Δp| against fp32 on real recordings, and speed.

Why: ``precision: auto`` keeps onnx-int8 only within 0.02 of fp32, and quantising every
GEMM of the 16-16 AudioSet model measured 0.020 — at the bound — so auto took the slower
onnx-fp32. Each recipe here is quantised from the same fp32 export, and every window is
scored by every recipe in turn (interleaved, so load from other programs hits all alike);
speed is the median over the timed rounds. Windows: ``--windows`` spread over the real
recordings (one in three files, joined) plus the 3 built-in check windows ``auto`` uses.

    PYTHONPATH=$PWD python bench/bench_int8.py --model /tmp/ast1616 --windows 16 \\
        --recipes all,per-channel,u8,no-head,ln,ln+fc2 --out bench/results/int8_recipes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from streamer.inference import cpu
from streamer.model import load_model

SHARED_REAL = Path("/work/shared/audio/real")
EVERY_NTH_FILE = 3


def recipes(graph_path: Path) -> dict[str, dict]:
    """``quantize_dynamic`` arguments per recipe, from the fp32 graph's node names and structure."""
    import onnx
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    gemms = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    edges = [n.name for n in graph.node if n.op_type in ("Gemm", "Conv")]  # the classifier and the patch embedding
    constants = {i.name for i in graph.initializer}
    normalised = {out for n in graph.node if n.op_type == "LayerNormalization" for out in n.output}
    ln = [n.name for n in graph.node  # qkv and fc1: the GEMMs fed by a LayerNorm
          if n.op_type == "MatMul" and n.input[0] in normalised and n.input[1] in constants]
    fc2 = [n for n in gemms if "/mlp/fc2/" in n]
    fc1 = [n for n in gemms if "/mlp/fc1/" in n]
    s8 = QuantType.QInt8
    return {
        "all": dict(weight_type=s8),  # what onnx-int8 was: every MatMul, Gemm and Conv
        "per-channel": dict(weight_type=s8, per_channel=True),
        "reduce-range": dict(weight_type=s8, reduce_range=True),
        "u8": dict(weight_type=QuantType.QUInt8),  # u8×u8: no int16 saturation of u8×s8 on AVX2 without VNNI
        "no-head": dict(weight_type=s8, nodes_to_exclude=edges),
        "ln": dict(weight_type=s8, nodes_to_quantize=ln),  # qkv and fc1 (the LayerNorm-fed GEMMs)
        "ln+fc2": dict(weight_type=s8, nodes_to_quantize=ln + fc2),  # every layer GEMM but proj
        "noproj": dict(weight_type=s8, nodes_to_quantize=ln + fc2),
        "mlp": dict(weight_type=s8, nodes_to_quantize=fc1 + fc2),  # 2/3 of a layer's GEMM work
        "ln+fc2-first-half": dict(weight_type=s8, nodes_to_quantize=ln + fc2[: len(fc2) // 2]),
        "ln+fc2-last-half": dict(weight_type=s8, nodes_to_quantize=ln + fc2[len(fc2) // 2:]),  # onnx-int8 now
        "cpu": dict(weight_type=s8, nodes_to_quantize=cpu.int8_nodes(graph_path)),  # the same, as cpu.py picks it
        "u8-ln": dict(weight_type=QuantType.QUInt8, nodes_to_quantize=ln),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=16, help="windows of real recordings (plus the 3 check windows)")
    parser.add_argument("--recipes", default="all,ln")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real", type=Path, default=SHARED_REAL)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from onnxruntime.quantization import quantize_dynamic

    from streamer.benchmark import _real_windows

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    directory = cpu.cache_dir(loaded, cpu.model_hash(loaded))
    fp32 = cpu.export_onnx(loaded, directory)
    audio = sorted(args.real.rglob("*.wav"))[::EVERY_NTH_FILE]
    real, source = _real_windows(loaded, audio, args.windows, hop_frames=100)
    check = cpu.check_windows(loaded)
    windows = torch.cat([real, check])
    known = recipes(fp32)
    forwards = {"fp32": loaded.model.eval(), "onnx-fp32": cpu.OnnxForward(fp32, args.threads)}
    quantised: dict[str, int] = {}
    for name in args.recipes.split(","):
        out = directory / f"bench-int8-{name}.onnx"
        if not out.is_file():
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                quantize_dynamic(str(fp32), str(out), **known[name])
            finally:
                logging.disable(previous)
        forwards[name] = cpu.OnnxForward(out, args.threads)
        quantised[name] = len(known[name].get("nodes_to_quantize", [])) or -1
    probs = loaded.model.probabilities
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in forwards}
    times: dict[str, list[float]] = {k: [] for k in forwards}
    with torch.inference_mode():
        for i in range(len(windows)):
            for name, forward in forwards.items():
                t0 = time.perf_counter()
                outs[name].append(probs(forward(windows[i:i + 1]))[0])
                if i:
                    times[name].append(time.perf_counter() - t0)
    ref = torch.stack(outs["fp32"])
    rows = []
    for name in forwards:
        dp = (torch.stack(outs[name]) - ref).abs().max(dim=1).values
        rows.append({"recipe": name, "s_per_window": round(statistics.median(times[name]), 3),
                     "vs_onnx_fp32": round(statistics.median(a / b for a, b in zip(times["onnx-fp32"], times[name])), 2),
                     "max_abs_dp_real": round(float(dp[:len(real)].max()), 4),
                     "max_abs_dp_check": round(float(dp[len(real):].max()), 4),
                     "matmuls_quantised": quantised.get(name)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": str(args.model), "config": f"{loaded.config.frequency_stride}-{loaded.config.time_stride}",
              "cpu": cpu.cpu_features().describe(), "threads": args.threads, "windows_real": len(real),
              "windows_check": len(check), "source": source, "timed_rounds": len(windows) - 1, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

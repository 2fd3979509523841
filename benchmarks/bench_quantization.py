"""fp32 vs INT8 vs 4-bit on CPU: file size, bits per weight, held-out bpb, generation bytes/s (batch 1, 8), eval time.

Trains each model briefly first (`bitlm train --local`, a fixed budget in minutes), on
tinyshakespeare's first 90% (bitlm prepare's split); the held-out text is its last 10%, read from
../shared and written only under --work (outside the repository). The 4-bit rows are the
post-training conversion of the fp32 model and, with --qat-minutes, of a model trained with --qat.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitlm.checkpoint import WEIGHTS, from_pretrained
from bitlm.evaluation import evaluate_text
from bitlm.quantization import storage_report
from bitlm.sampling import generate_ids, prompt_ids

from common import SHAKESPEARE, emit, load_shakespeare

BITLM = [str(Path(sys.executable).parent / "bitlm")]


def cli(*args: str) -> float:
    """Run a bitlm command quietly; returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([*BITLM, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def bytes_per_second(models: dict, prompt: bytes, batch: int, new_bytes: int, repeats: int) -> dict[str, float]:
    """Generation bytes/s of each model, best of `repeats`, the formats interleaved so load drifts hit all alike."""
    best = dict.fromkeys(models, float("inf"))
    for model in models.values():  # warm-up (builds the INT8 kernels)
        generate_ids(model, prompt_ids(model.config, prompt)[None], model.config.ids_per_byte, seed=0)
    for _ in range(repeats):
        for fmt, model in models.items():
            ids = prompt_ids(model.config, prompt)[None].repeat(batch, 1)
            start = time.perf_counter()
            generate_ids(model, ids, new_bytes * model.config.ids_per_byte, seed=0)
            best[fmt] = min(best[fmt], time.perf_counter() - start)
    return {fmt: batch * new_bytes / seconds for fmt, seconds in best.items()}


def layers_only(args) -> None:
    from bitlm.quantization import Int4Linear, Int8Linear

    for d in (128, 512, 1024):
        torch.manual_seed(0)
        linear = torch.nn.Linear(d, 4 * d)
        layers = {"fp32": linear, "int8": Int8Linear.from_linear(linear), "int4": Int4Linear.from_linear(linear)}
        x = torch.randn(1, d)
        best = dict.fromkeys(layers, float("inf"))
        with torch.no_grad():
            for layer in layers.values():
                layer(x)
            for _ in range(args.repeats):
                for fmt, layer in layers.items():
                    start = time.perf_counter()
                    for _ in range(200):
                        layer(x)
                    best[fmt] = min(best[fmt], (time.perf_counter() - start) / 200)
        for fmt, seconds in best.items():
            emit({"bench": "quantization_layer", "in_features": d, "out_features": 4 * d, "rows": 1, "format": fmt,
                  "us_per_call": seconds * 1e6, "speedup": best["fp32"] / seconds,
                  "note": "2-core machine shared with 3 engineers"}, args.out)


def speed_only(args, prompt: bytes) -> None:
    from bitlm.config import ModelConfig
    from bitlm.model import BitTransformerLM
    from bitlm.quantization import quantize_dynamic, quantize_int4

    for kind in args.models.split(","):
        torch.manual_seed(0)
        model = BitTransformerLM(ModelConfig.from_name(args.preset, kind=kind)).eval()
        models = {"fp32": model, "int8": quantize_dynamic(model), "int4": quantize_int4(model)}
        speeds = {batch: bytes_per_second(models, prompt, batch, args.new_bytes, args.repeats) for batch in (1, 8)}
        for fmt in models:
            emit({"bench": "quantization_speed", "model": kind, "preset": args.preset, "format": fmt, "trained": False,
                  "params": model.num_parameters(), "new_bytes": args.new_bytes,
                  **{f"gen_bytes_per_s_b{b}": speeds[b][fmt] for b in (1, 8)},
                  **{f"gen_speedup_b{b}": speeds[b][fmt] / speeds[b]["fp32"] for b in (1, 8)},
                  "note": "2-core machine shared with 3 engineers"}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bitlm-bench-quantization"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--models", default="patched,byte")
    parser.add_argument("--minutes", type=float, default=4.0, help="Training budget per model.")
    parser.add_argument("--qat-minutes", type=float, default=0.0, help="Also train a --qat patched model.")
    parser.add_argument("--eval-bytes", type=int, default=20_000, help="Held-out bytes scored per model.")
    parser.add_argument("--new-bytes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true",
                        help="Untrained --preset models, quantized in memory: generation bytes/s only.")
    parser.add_argument("--layers-only", action="store_true",
                        help="One linear layer per shape (d -> 4d, one row): microseconds per call per format.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.layers_only:
        return layers_only(args)
    text = load_shakespeare()
    if args.speed_only:
        return speed_only(args, text[int(len(text) * 0.9):][:64])
    heldout = args.work / "heldout.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    heldout.write_bytes(text[int(len(text) * 0.9):][: args.eval_bytes])
    data = args.work / "data"
    if not (data / "manifest.json").exists():
        cli("prepare", str(SHAKESPEARE), "--out", str(data), "--quiet")
    runs = [(kind, kind, ()) for kind in args.models.split(",")]
    if args.qat_minutes:
        runs.append(("patched", "patched-qat", ("--qat",)))
    prompt = text[int(len(text) * 0.9):][:64]
    for kind, name, extra in runs:
        run = args.work / name
        minutes = args.qat_minutes if extra else args.minutes
        if not (run / "model" / WEIGHTS).exists():
            cli("train", "--local", "--data", str(data), "--out", str(run), "--preset", args.preset, "--arch", kind,
                "--minutes", str(minutes), "--no-resume", *extra)
        formats = {"fp32": run / "model"}
        for method in ("int8", "int4"):
            formats[method] = run / method
            cli("quantize", str(run / "model"), f"--{method}", "--out", str(formats[method]))
        fp32_size = (formats["fp32"] / WEIGHTS).stat().st_size
        rows, models = {}, {}
        for fmt, directory in formats.items():
            model = models[fmt] = from_pretrained(directory).eval()
            report = storage_report(model)
            bpb = evaluate_text(model, heldout.read_bytes())["bpb"]
            eval_s = cli("eval", str(directory), str(heldout), "--json")
            rows[fmt] = {"bench": "quantization", "model": name, "preset": args.preset, "format": fmt,
                         "train_minutes": minutes, "file_bytes": (directory / WEIGHTS).stat().st_size,
                         "file_ratio_to_fp32": (directory / WEIGHTS).stat().st_size / fp32_size,
                         "linear_bits_per_weight": report["linear_bits_per_weight"],
                         "quantized_bits_per_weight": report["quantized_bits_per_weight"],
                         "bits_per_parameter": report["bits_per_parameter"], "heldout_bytes": len(heldout.read_bytes()),
                         "heldout_bpb": bpb, "eval_cli_s": eval_s}
        for batch in (1, 8):
            for fmt, speed in bytes_per_second(models, prompt, batch, args.new_bytes, args.repeats).items():
                rows[fmt][f"gen_bytes_per_s_b{batch}"] = speed
        for fmt, row in rows.items():
            for batch in (1, 8):
                row[f"gen_speedup_b{batch}"] = row[f"gen_bytes_per_s_b{batch}"] / rows["fp32"][f"gen_bytes_per_s_b{batch}"]
            row["bpb_change"] = row["heldout_bpb"] - rows["fp32"]["heldout_bpb"]
            emit(row | {"torch_threads_set": torch.get_num_threads(), "note": "2-core machine shared with 3 engineers"},
                 args.out)


if __name__ == "__main__":
    main()

"""Peak training memory vs depth, plain vs reversible blocks (one fresh process per configuration).

Peak = the process' peak resident memory during two training steps (after the model and
optimizer exist; /proc/self/clear_refs resets the high-water mark) minus its resident memory
before the model was built, so it counts parameters, gradients, optimizer state and activations
but not the torch runtime. Also reported: bytes of tensors saved for backward by one forward.

Children run with MALLOC_MMAP_THRESHOLD_=1 MiB. By default glibc raises its mmap threshold after
the first large free, so later activation-sized tensors (~9 MiB here) come from the heap, whose
fragmentation keeps RSS near its high-water mark: the peak then grows with depth even when live
memory does not (measured: reversible 16 layers 1511 MiB by default vs 398 MiB pinned; live
saved-for-backward bytes are identical). Pinning the threshold makes RSS follow live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import emit


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(n_layers: int, reversible: bool, batch_size: int, context_bytes: int) -> dict:
    import torch

    from bitlm.config import ModelConfig
    from bitlm.model import BitTransformerLM

    torch.manual_seed(0)
    before = _status_kib("VmRSS")
    T = context_bytes * 9
    model = BitTransformerLM(ModelConfig.from_name("small", n_layers=n_layers, reversible=reversible,
                                                   max_positions=T)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 2, (batch_size, T))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    saved = 0
    for step in range(2):
        def pack(t):
            nonlocal saved
            if step == 0:
                saved += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    peak = _status_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "saved_for_backward_mib": saved / 2**20,
            "params": model.num_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-bytes", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("N_LAYERS", "REVERSIBLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "1", args.batch_size, args.context_bytes)))
        return
    for reversible in (False, True):
        for depth in (int(d) for d in args.depths.split(",")):
            cmd = [sys.executable, __file__, "--child", str(depth), "1" if reversible else "0",
                   "--batch-size", str(args.batch_size), "--context-bytes", str(args.context_bytes)]
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            emit({"bench": "train_memory", "n_layers": depth, "reversible": reversible, "preset": "small",
                  "batch_size": args.batch_size, "bits_per_sequence": args.context_bytes * 9,
                  "malloc_mmap_threshold": 1 << 20} | result, args.out)


if __name__ == "__main__":
    main()

"""The safety gate's error rates over a grid of its settings, on the telemetry search's probe sets.

The telemetry space searches the gate's floors, EMA decay and burn-in beside the K/C/S
regularisers, but the gate decides on the text's C and S alone (tune/probes.py), so its error
rates do not depend on the trained weights: one pass computes the probe telemetry (tinyshakespeare's
last 10% as held-out text, reference marginals from the first 90%, the same three probe sets as a
Tune trial) and every setting is scored against it. A user picks floors from this table. Run from
benchmarks/: python bench_gate_floors.py [--n-probes 64] [--out results/gate_floors.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
from common import emit, load_shakespeare

from bitlm.data import bit_marginals
from bitlm.safety import SafetyConfig
from tune.probes import error_rates, probe_telemetry

C_FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
S_FLOORS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DECAYS = (0.0, 0.5, 0.9)
BURN_INS = (0, 1, 2, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-probes", type=int, default=64, help="streams per probe set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gate_floors.jsonl")
    args = parser.parse_args(argv)

    data = load_shakespeare()
    split = int(len(data) * 0.9)
    start = time.perf_counter()
    tables = {}
    for parity in (True, False):
        reference = bit_marginals(np.frombuffer(data[:split], dtype=np.uint8), parity=parity)
        tables[parity] = probe_telemetry(data[split:], reference, parity=parity, n_probes=args.n_probes,
                                         seed=args.seed)
    telemetry_s = time.perf_counter() - start
    base = {"bench": "gate_floors", "n_probes": args.n_probes, "seed": args.seed, "telemetry_seconds": round(telemetry_s, 1)}
    for parity, c_floor, s_floor in itertools.product((True, False), C_FLOORS, S_FLOORS):
        rates = error_rates(tables[parity], SafetyConfig(c_floor=c_floor, s_floor=s_floor))
        emit(base | {"table": "floors", "parity": parity, "c_floor": c_floor, "s_floor": s_floor} | rates, args.out)
    for parity, decay, burn_in in itertools.product((True, False), DECAYS, BURN_INS):
        rates = error_rates(tables[parity], SafetyConfig(decay=decay, burn_in=burn_in))
        emit(base | {"table": "smoothing", "parity": parity, "decay": decay, "burn_in": burn_in} | rates, args.out)


if __name__ == "__main__":
    main()

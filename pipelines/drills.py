"""Failure drills that need their own Ray cluster: a multi-node run that loses a node mid-training.

`python -m pipelines.drills node-loss --data DIR --storage DIR` starts a `ray.cluster_utils.Cluster`
(a head with no CPUs and three 1-CPU worker nodes), trains two workers, removes the node of the
last rank once the first checkpoint is in storage, and prints the result as JSON. The spare node
is the capacity the restarted worker group lands on. (Nodes can only be added from the main
thread, which is busy driving the run, so the spare exists from the start.)
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import click

from bitlm.config import ModelConfig, TrainConfig

from .train import PipelineConfig, RayRunConfig, run_directory, train_driver


def _remove_a_worker_node_after_first_checkpoint(cluster, run_dir: Path, events: list, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        placement = run_dir / "workers" / "rank-1.json"
        if placement.exists() and any(p.name.startswith("step-") for p in run_dir.glob("*") if p.is_dir()):
            node_id = json.loads(placement.read_text())["node_id"]
            for node in cluster.list_all_nodes():
                if node.node_id == node_id:
                    cluster.remove_node(node)
                    events.append({"removed_node": node_id, "at": time.time()})
                    return
        time.sleep(0.2)


@click.group()
def main():
    """Failure drills on a local multi-node Ray cluster."""


@main.command("node-loss")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared corpus.")
@click.option("--storage", required=True, type=click.Path(file_okay=False), help="Ray Train storage path.")
@click.option("--steps", default=24, show_default=True)
def node_loss(data, storage, steps):
    """Lose one of two worker nodes after the first checkpoint; training must finish all steps."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = PipelineConfig(
        model=ModelConfig.from_name("tiny", kind="patched", max_positions=64),
        train=TrainConfig(batch_size=4, context_bytes=32, max_steps=steps, warmup_steps=2, log_every_steps=4,
                          eval_every_steps=8, n_eval_batches=2, checkpoint_every_steps=4, precision="fp32"),
        run=RayRunConfig(name="node-loss", storage_path=str(Path(storage).resolve()), data=data, num_workers=2,
                         max_failures=3, tracking=False))
    events: list = []
    watcher = threading.Thread(target=_remove_a_worker_node_after_first_checkpoint,
                               args=(cluster, run_directory(cfg), events), daemon=True)
    watcher.start()
    try:
        result = train_driver(cfg)
        out = {"step": result.metrics.get("step"), "val_bpb": result.metrics.get("val/bpb"),
               "events": events, "error": None}
    except Exception as err:  # report, never hang the caller
        out = {"step": None, "val_bpb": None, "events": events, "error": repr(err)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    click.echo("DRILL " + json.dumps(out))


if __name__ == "__main__":
    main()

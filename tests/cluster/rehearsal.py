"""Multi-node rehearsal, run as its own process by test_rehearsal.py: `python tests/cluster/rehearsal.py DIR`.

A `ray.cluster_utils.Cluster` of logical nodes on this machine: a head with no CPUs (like the
configs' head, it runs drivers, not workers) and three 1-CPU worker nodes, one of them offering a
logical GPU. The training pipeline runs two 1-CPU workers on it, so no two fit on one node and
each lands on its own worker node; then the Serve app is deployed with its HTTP proxy on the head
and one replica, which can only be placed on a worker node. Prints one JSON line (REHEARSAL {...})
with what the caller checks. Its own RAY_TMPDIR keeps the cluster's address file out of /tmp/ray.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_T0 = time.time()


def phase(name: str) -> None:
    print(f"rehearsal: {name} at {time.time() - _T0:.1f} s", file=sys.stderr, flush=True)


def main(work: Path) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from bitlm.config import ModelConfig, TrainConfig
    from pipelines.train import PipelineConfig, RayRunConfig, run_directory, train_driver
    from serve.app import build_app

    port = free_port()
    # every process of this cluster resolves "the cluster" to this one, never another on the machine
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # the dashboard: Ray Train's controller and the state API (which replica is where) read through it
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": port, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port()})
    workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1, num_gpus=1)]
    out: dict = {"head": cluster.head_node.node_id, "workers": [n.node_id for n in workers]}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        out["gpu_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        cfg = PipelineConfig(
            model=ModelConfig.from_name("tiny", kind="patched", max_positions=64),
            train=TrainConfig(batch_size=4, context_bytes=32, max_steps=4, warmup_steps=1, log_every=2, eval_every=4,
                              eval_batches=1, checkpoint_every=4, precision="fp32"),
            run=RayRunConfig(name="rehearsal", storage_path=str(work / "ray"), data=str(work / "data"),
                             num_workers=2, cpus_per_worker=1.0, tracking=False))
        phase("cluster up")
        result = train_driver(cfg)
        phase("trained")
        run_dir = run_directory(cfg)
        ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank-*.json"))]
        out["train"] = {"step": result.metrics.get("step"), "rank_nodes": [r["node_id"] for r in ranks]}

        http = free_port()
        # one proxy, on the head: logical nodes share this machine's ports
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http})
        app = build_app({"model": str(run_dir / "model"), "allowed_roots": [str(work)], "num_cpus": 0.5,
                         "audit_log": str(work / "audit.jsonl")})
        serve.run(app, name="bitlm", route_prefix="/", blocking=False)
        body = json.dumps({"prompt": "So ", "max_new_bytes": 8, "seed": 0, "strict": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v1/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                    if a.class_name.startswith("ServeReplica:bitlm:")]
        out["serve"] = {"status": response.status, "n_bits": answer.get("n_bits"),
                        "replica_nodes": [a.node_id for a in replicas]}
        phase("served")
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    started = time.time()
    result = main(Path(sys.argv[1]).resolve())
    result["seconds"] = round(time.time() - started, 1)
    print("REHEARSAL " + json.dumps(result), flush=True)

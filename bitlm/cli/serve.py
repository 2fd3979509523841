"""`bitlm serve`: host a model behind the safety gate over HTTP with Ray Serve."""

from __future__ import annotations

import signal
import time

import click


@click.command("serve")
@click.option("--model", "source", required=True,
              help="A save_pretrained or checkpoint directory (under an allowed root), runs:/<id>/model or "
                   "models:/<name>@<alias>.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy binds.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Model replicas.")
@click.option("--num-cpus", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CPUs reserved per replica (fractions allowed).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Generation requests decoded together (@serve.batch).")
@click.option("--allowed-root", "allowed_roots", multiple=True, type=click.Path(file_okay=False),
              help="Directory a local --model may resolve into; repeatable [default: BITLM_SERVE_ROOTS, else cwd].")
@click.option("--audit-log", default="serve_audit.jsonl", show_default=True, help="One JSON line per gate verdict.")
@click.option("--address", default=None,
              help="Deploy to a running Ray cluster (e.g. auto or ray://host:10001) and return; "
                   "default: start a local Ray and serve until Ctrl-C.")
def serve_command(source, host, port, replicas, num_cpus, max_batch_size, allowed_roots, audit_log, address):
    """Serve --model at http://HOST:PORT (/v1/generate, /v1/score, /v1/model, /healthz, /docs).

    Set BITLM_API_TOKEN to require `Authorization: Bearer <token>` on /v1. Limits and floors
    beyond these options: `serve run serve.app:build_app model=... max_new_bytes=...` or
    serve/serve_config.yaml with `serve deploy`.
    """
    import ray
    from ray import serve as ray_serve

    from serve.app import build_app
    from serve.sources import SourceError

    args = {"model": source, "num_replicas": replicas, "num_cpus": num_cpus, "max_batch_size": max_batch_size,
            "allowed_roots": list(allowed_roots), "audit_log": audit_log}
    try:
        app = build_app(args)
    except (SourceError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--model") from None
    # without --address always a new local instance, never another cluster this machine happens to run
    ray.init(address=address or "local", include_dashboard=False if address is None else None,
             log_to_driver=address is None)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(app, name="bitlm", route_prefix="/", blocking=False)
    click.echo(f"serving {source} at http://{host}:{port} (API docs: http://{host}:{port}/docs)")
    if address is not None:
        return  # the application stays on the cluster; `serve shutdown` removes it
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and container stops shut Serve down cleanly too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("shutting down")
    finally:
        ray_serve.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

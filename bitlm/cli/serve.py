"""`bitlm serve`: host a model behind the safety gate over HTTP with Ray Serve."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time

import click


@click.command("serve")
@click.option("--model", "source", required=True,
              help="A save_pretrained, checkpoint or run directory (its model/, else its newest checkpoint) "
                   "under an allowed root, runs:/<id>/model or models:/<name>@<alias>.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy binds.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Model replicas.")
@click.option("--num-cpus", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CPUs reserved per replica (fractions allowed).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Generation requests decoded together (@serve.batch).")
@click.option("--allowed-root", "allowed_roots", multiple=True, type=click.Path(file_okay=False),
              help="Directory a local --model may resolve into; repeatable [default: BITLM_SERVE_ROOTS, else cwd].")
@click.option("--c-floor", type=click.FloatRange(0, 1), default=None,
              help="The gate's C floor for requests that give none [the served run's safety.c_floor, else 0.3].")
@click.option("--s-floor", type=click.FloatRange(0, 1), default=None,
              help="The gate's S floor for requests that give none [the served run's safety.s_floor, else 0.5].")
@click.option("--audit-log", default="serve_audit.jsonl", show_default=True, help="One JSON line per gate verdict.")
@click.option("--address", default=None,
              help="Deploy to a running Ray cluster (e.g. auto or ray://host:10001) and return "
                   "[RAY_ADDRESS, else the cluster of `bitlm cluster up --local`]; "
                   "with none, start a local Ray and serve until Ctrl-C.")
def serve_command(source, host, port, replicas, num_cpus, max_batch_size, allowed_roots, c_floor, s_floor, audit_log,
                  address):
    """Serve --model at http://HOST:PORT (/v1/generate, /v1/score, /v1/model, /healthz, /docs).

    Set BITLM_API_TOKEN to require `Authorization: Bearer <token>` on /v1. Limits and floors
    beyond these options: `serve run serve.app:build_app model=... max_new_bytes=...` or
    serve/serve_config.yaml with `serve deploy`.
    """
    from serve.app import build_app
    from serve.audit import AuditLogError

    # RAY_ADDRESS (set from a running `bitlm cluster up --local` by the bitlm group) counts as --address
    address = address or os.environ.get("RAY_ADDRESS") or None
    # everything that can go wrong here is found before Ray starts: one line instead of Ray's retries
    if address is None:  # on a cluster the proxy binds there, and the cluster's CPUs count
        _check_bindable(host, port)
        n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if replicas * num_cpus > n_cpus:  # the local Ray would wait forever to place the replicas
            raise click.BadParameter(f"{replicas} replica(s) x {num_cpus:g} CPUs exceed the {n_cpus} CPUs of this "
                                     "machine; lower --num-cpus or --replicas", param_hint="--num-cpus")
    args = {"model": source, "num_replicas": replicas, "num_cpus": num_cpus, "max_batch_size": max_batch_size,
            "allowed_roots": list(allowed_roots), "audit_log": audit_log, "c_floor": c_floor, "s_floor": s_floor}
    try:
        app = build_app(args)  # resolves and validates the model, opens the audit log
    except AuditLogError as err:
        raise click.BadParameter(str(err), param_hint="--audit-log") from None
    except ValueError as err:  # SourceError, CheckpointError
        raise click.BadParameter(str(err), param_hint="--model") from None
    import ray
    from ray import serve as ray_serve

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


def _check_bindable(host: str, port: int) -> None:
    """BadParameter naming --port (in use) or --host (not an address of this machine) unless HOST:PORT can be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise click.BadParameter(f"{host!r} does not resolve ({err.strerror})", param_hint="--host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server binds
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise click.BadParameter(f"port {port} on {host} is in use (stop what listens there, or pick "
                                         "another --port)", param_hint="--port") from None
            raise click.BadParameter(f"cannot bind {host}:{port} ({err.strerror})", param_hint="--host") from None

"""`bitlm ui`: the MLflow web UI over the store that training runs log to."""

from __future__ import annotations

import ipaddress
import os
import sys

import click

from ..store import default_tracking_uri


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("ui")
@click.option("--port", type=int, default=5000, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. The UI has no login: anything but a loopback address lets "
                   "every machine that can reach this one read and change your runs.")
@click.option("--backend-store-uri", default=None,
              help="Store to show (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db, "
                   "the default of pipelines.tracking for runs started in this directory).")
def ui_command(port, host, backend_store_uri):
    """Serve the MLflow UI for this directory's runs on http://127.0.0.1:5000 until Ctrl-C.

    Runs `mlflow server` with one worker and MLflow's job runner off (its defaults start 16
    processes and ~3.6 GiB; this is 3 processes and ~570 MiB), bound to 127.0.0.1 unless --host
    says otherwise.
    """
    if not _is_loopback(host):
        click.echo(f"warning: --host {host} is not a loopback address; the MLflow UI has no "
                   "authentication, so anyone who can reach this port can read and edit runs.", err=True)
    uri = backend_store_uri or default_tracking_uri()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    click.echo(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, so Ctrl-C and a terminate() reach the server itself rather than a parent that would
    # leave it running
    os.execve(sys.executable, argv, env)

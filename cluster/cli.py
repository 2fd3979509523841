"""`bitlm cluster`: bring a cluster up or down, see its state, and run jobs on it.

No ML code here: a cluster is processes, addresses and a job API. `--local` is a Ray head and an
MLflow server on this machine; `--config NAME|PATH` is a Ray cluster-launcher config (AWS, GCP)
run through `ray up/down/exec`.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Optional

import click

from . import state

_CONFIG_HELP = "Launcher config: a name in cluster/configs/ (aws-gpu, gcp-gpu) or a YAML path."


@click.group("cluster")
def cluster_group() -> None:
    """Start, stop and use a Ray cluster: a local head (--local) or a GPU cluster on AWS / GCP (--config).

    \b
    bitlm cluster up --local                  # Ray head + MLflow server on 127.0.0.1
    bitlm cluster submit --config pipelines/configs/tiny-cpu.json --set run.data=$PWD/data/corpus
    bitlm cluster jobs; bitlm cluster logs JOB --follow
    bitlm cluster down --local
    bitlm cluster up --config aws-gpu         # ray up cluster/configs/aws-gpu.yaml

    After `up --local`, `bitlm train`, `bitlm tune` and `bitlm serve` run on that cluster and log
    to its MLflow server unless --address, RAY_ADDRESS or MLFLOW_TRACKING_URI say otherwise.
    """


def _need_one(local: bool, config: Optional[str]) -> None:
    if local == (config is not None):
        raise click.UsageError("give either --local or --config NAME|PATH")


def _cloud(config: str, credentials: bool = True):
    from .cloud import ConfigError, preflight

    try:
        return preflight(config, credentials=credentials)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


def _ray() -> str:
    from .local import ClusterError, ray_executable

    try:
        return ray_executable()
    except ClusterError as err:
        raise click.ClickException(str(err)) from None


@cluster_group.command("up")
@click.option("--local", is_flag=True, help="Start a Ray head and an MLflow server on this machine (127.0.0.1).")
@click.option("--config", default=None, metavar="NAME|PATH", help=_CONFIG_HELP)
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="--local: CPUs the head offers [all of this machine's].")
@click.option("--num-gpus", type=click.IntRange(min=0), default=0, show_default=True, help="--local: GPUs it offers.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=180, show_default=True,
              help="--local: seconds to wait for Ray and MLflow to answer.")
def up_command(local, config, num_cpus, num_gpus, timeout_s):
    """Start a cluster and record where it is.

    --local starts `ray start --head` (its own temp dir under /tmp and free ports, dashboard on
    127.0.0.1) and `mlflow server --workers 1` (SQLite store and artifacts under
    $BITLM_CLUSTER_HOME, default ~/.bitlm/cluster), each in its own process group, and records
    their addresses and PIDs in local.json there. A second `up --local` while one runs is refused.

    --config runs `ray up -y` after checking, before anything is contacted, that the file exists,
    names a supported provider (aws, gcp), that the files it references exist, that no CHANGE-ME
    is left, and that the cloud SDK and credentials are present. What runs is a rendered copy in
    $BITLM_CLUSTER_HOME/rendered/: BITLM_IMAGE replaces the image, and MLFLOW_BACKEND_STORE_URI,
    MLFLOW_ARTIFACTS_DESTINATION and the cluster's Ray auth token (made once, <cluster_name>.token
    there) reach every node.
    """
    _need_one(local, config)
    if config is not None:
        from .cloud import cluster_token, render, write_rendered

        path, loaded = _cloud(config)
        rendered_dir = state.home() / "rendered"
        token = cluster_token(rendered_dir, str(loaded["cluster_name"]))
        rendered = write_rendered(render(loaded, os.environ, token), path, rendered_dir)
        click.echo(f"ray up {path.name} (rendered copy: {rendered}; Ray auth token: "
                   f"{rendered_dir / (str(loaded['cluster_name']) + '.token')})", err=True)
        raise SystemExit(_run_ray("up", "-y", str(rendered)))
    from .local import AlreadyRunning, ClusterError, start

    cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        cluster = start(num_cpus=cpus, num_gpus=num_gpus, timeout_s=timeout_s,
                        echo=lambda line: click.echo(line, err=True))
    except AlreadyRunning as err:
        raise click.ClickException(str(err)) from None
    except ClusterError as err:
        raise click.ClickException(f"local cluster not started: {err}") from None
    click.echo(f"Ray:       {cluster.ray_address} ({cluster.num_cpus} CPUs)\n"
               f"dashboard: {cluster.dashboard_url}\n"
               f"MLflow:    {cluster.mlflow_uri} (store and artifacts in {Path(cluster.home) / 'mlflow'})\n"
               f"state:     {state.state_path()}\n"
               "next: bitlm cluster submit -- python -m pipelines.train --config FILE --set run.data=DIR")


def _run_ray(*args: str) -> int:
    from .cloud import ray_command

    return ray_command(_ray(), *args)


@cluster_group.command("down")
@click.option("--local", is_flag=True, help="Stop the recorded local head and MLflow server.")
@click.option("--config", default=None, metavar="NAME|PATH", help=_CONFIG_HELP)
def down_command(local, config):
    """Stop a cluster.

    --local sends SIGTERM to the process groups `up --local` started, SIGKILL to anything of
    theirs still running after 30 s, and removes the state file. Only recorded processes (same
    PID and start time) and the members of their groups are signalled. --config runs
    `ray down -y CONFIG` after the same checks as `up`.
    """
    _need_one(local, config)
    if config is not None:
        path, _ = _cloud(config)
        raise SystemExit(_run_ray("down", "-y", str(path)))
    from .local import locked, stop

    with locked(state.home()):
        cluster = _read_state()
        if cluster is None:
            click.echo(f"no local cluster recorded ({state.state_path()})", err=True)
            return
        stopped = stop(cluster)
        state.remove()
    leaders = ", ".join(p.name for p in cluster.leaders())
    click.echo(f"stopped the local cluster: {len(stopped)} running process(es) of {leaders} and their groups"
               if stopped else "the local cluster had already stopped; record removed")


def _read_state():
    try:
        return state.read()
    except ValueError as err:
        raise click.ClickException(str(err)) from None


@cluster_group.command("status")
@click.option("--local", is_flag=True, help="The recorded local cluster (the default when no --config).")
@click.option("--config", default=None, metavar="NAME|PATH", help=_CONFIG_HELP)
def status_command(local, config):
    """Say where the cluster is and whether it runs, with what `ray status` reports.

    --local (or nothing): the recorded addresses, each recorded process and whether it runs, the
    MLflow server's health, and `ray status` of the head; exits 1 when no local cluster runs.
    --config: `ray exec CONFIG 'ray status'` on the head.
    """
    if config is not None:
        path, _ = _cloud(config)
        raise SystemExit(_run_ray("exec", str(path), "ray status"))
    cluster = _read_state()
    if cluster is None:
        raise click.ClickException(f"no local cluster recorded ({state.state_path()}); `bitlm cluster up --local`")
    running = cluster.running()
    click.echo(f"local cluster: {'running' if running else 'NOT running (stale record)'} (state {state.state_path()})")
    click.echo(f"  Ray:       {cluster.ray_address}   dashboard {cluster.dashboard_url}")
    click.echo(f"  MLflow:    {cluster.mlflow_uri}   {_mlflow_health(cluster.mlflow_uri)}")
    for process in cluster.leaders():
        click.echo(f"  pid {process.pid:>7}  {'running' if process.alive() else 'gone   '}  {process.name} (group leader)")
    others = [p for p in cluster.processes if not p.group_leader]
    click.echo(f"  + {len(others)} recorded processes of their groups, {sum(p.alive() for p in others)} running")
    if not running:
        raise click.ClickException("the local cluster is not running; `bitlm cluster down --local` clears the record")
    click.echo("ray status:")
    done = subprocess.run([_ray(), "status", f"--address={cluster.ray_address}"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, RAY_AUTH_MODE=cluster.auth_mode))
    for line in (done.stdout or done.stderr).strip().splitlines():
        click.echo(f"  {line}")


def _mlflow_health(uri: str) -> str:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return f"health: {response.read().decode().strip()}"
    except OSError as err:
        return f"health: no answer ({err})"


def _job_target(address: Optional[str]) -> tuple[str, Optional[str], bool]:
    """(dashboard URL, auth mode, is the recorded local cluster) for the job commands."""
    env_address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    explicit = address or (env_address if env_address.startswith(("http://", "https://")) else None)
    if explicit:
        return explicit, None, False
    cluster = _read_state()
    if cluster is not None and cluster.running():
        return cluster.dashboard_url, cluster.auth_mode, True
    raise click.ClickException("no cluster to talk to: `bitlm cluster up --local`, or --address http://HOST:8265 "
                               "(for a cloud cluster, `ray dashboard CONFIG` forwards its dashboard to "
                               "http://127.0.0.1:8265)")


def _client(address: Optional[str]):
    from .jobs import job_client

    url, auth_mode, local = _job_target(address)
    try:
        return job_client(url, auth_mode), url, local
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise click.ClickException(f"cannot reach the job API at {url}: {err}") from None


_ADDRESS = click.option("--address", default=None, metavar="URL",
                        help="Job API (the dashboard, http://HOST:8265) [RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                             "else the recorded local cluster].")


@cluster_group.command("submit", context_settings={"ignore_unknown_options": True})
@_ADDRESS
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="Run config for the entry point (`--config FILE`); must lie inside the working dir.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override passed to the entry point; repeatable.")
@click.option("--mlflow-uri", default=None,
              help="MLFLOW_TRACKING_URI of the job [this environment's, else the local cluster's MLflow server, "
                   "else the cluster's own].")
@click.option("--env", "env_items", multiple=True, metavar="KEY=VALUE", help="Extra environment variable; repeatable.")
@click.option("--working-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Directory the job runs in, uploaded by Ray [the project: nearest pyproject.toml upwards].")
@click.option("--job-id", default=None, help="Submission id [generated by Ray].")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the job's log until it ends and exit non-zero unless it SUCCEEDED.")
@click.argument("entrypoint", nargs=-1, type=click.UNPROCESSED)
def submit_command(address, config_file, sets, mlflow_uri, env_items, working_dir, job_id, wait, entrypoint):
    """Run ENTRYPOINT (default: python -m pipelines.train) as a Ray job: bitlm cluster submit [OPTIONS] -- CMD...

    --config and --set are appended to the entry point. The project directory is the job's working
    dir (without .venv, .git, runs/, data/, caches and weights), so paths in --set should be
    absolute paths the cluster can read. On the local cluster, the default entry point also gets
    run.storage_path=<project>/runs/ray unless --set gives one (a relative path would land in Ray's
    temporary copy of the working dir).
    """
    from .jobs import JobError, build_entrypoint, follow, project_root, runtime_env, submit

    client, url, local = _client(address)
    root = Path(working_dir).resolve() if working_dir else project_root()
    env = {}
    for item in env_items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--env")
        env[key] = value
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (_read_state().mlflow_uri if local else None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    defaults = ()
    if local and not entrypoint and not any(s.startswith("run.storage_path=") for s in sets):
        defaults = (f"run.storage_path={root / 'runs' / 'ray'}",)
    try:
        command = build_entrypoint(entrypoint, root, config_file, sets, defaults)
        job = submit(client, command, runtime_env(root, env), submission_id=job_id)
    except JobError as err:
        raise click.ClickException(str(err)) from None
    except RuntimeError as err:  # the job API's refusal (a taken id, an upload that failed)
        raise click.ClickException(f"submission refused by {url}: {str(err).strip().splitlines()[-1]}") from None
    click.echo(f"submitted {job} to {url}: {command}" + (f" (MLflow {uri})" if uri else ""), err=True)
    if not wait:
        click.echo(job)
        return
    try:
        status = follow(client, job, lambda chunk: click.echo(chunk, nl=False))
    except KeyboardInterrupt:
        raise click.ClickException(f"stopped following; the job runs on (`bitlm cluster logs {job} --follow`)")
    click.echo(f"job {job}: {status}", err=True)
    if status != "SUCCEEDED":
        raise SystemExit(1)


@cluster_group.command("logs")
@click.argument("job")
@_ADDRESS
@click.option("-f", "--follow", "follow_log", is_flag=True, help="Keep printing until the job ends.")
def logs_command(job, address, follow_log):
    """Print the log of JOB (a submission id from `bitlm cluster jobs`)."""
    from .jobs import follow, without_ray_info

    client, url, _ = _client(address)
    try:
        if follow_log:
            status = follow(client, job, lambda chunk: click.echo(chunk, nl=False))
            click.echo(f"job {job}: {status}", err=True)
        else:
            click.echo(without_ray_info(client.get_job_logs(job)), nl=False)
    except RuntimeError as err:
        raise click.ClickException(f"{job} on {url}: {str(err).strip().splitlines()[-1]}") from None


@cluster_group.command("jobs")
@_ADDRESS
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest jobs shown.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job.")
def jobs_command(address, limit, as_json):
    """List the cluster's jobs, newest first: id, status, start time (UTC) and entry point."""
    from .jobs import describe

    client, _, _ = _client(address)
    rows = describe(client, limit)
    for row in rows:
        click.echo(json.dumps(row) if as_json else
                   f"{row['id']:<28} {row['status']:<10} {row['started']:<20} {row['entrypoint'][:80]}")
    if not rows and not as_json:
        click.echo("no jobs", err=True)

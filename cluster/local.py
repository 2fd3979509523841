"""A local cluster: `ray start --head` on 127.0.0.1 and an MLflow server, each in its own process group.

Both run detached from the terminal (their own sessions), log into `<home>/logs/`, and are
recorded in the state file with every process of their groups, so `stop` signals exactly those
and nothing else on the machine. Ray gets its own short temp dir under /tmp (its socket paths
must fit in 107 bytes) and free ports; its dashboard binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import state
from .state import LocalCluster, Process

SOCKET_PATH_MAX = 107  # sun_path of an AF_UNIX socket, less the terminating NUL
# the longest socket Ray makes under its temp dir: session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
_RAY_SOCKET_SUFFIX = len("/session_2026-12-02_16-53-26_907336_4194304/sockets/plasma_store")


class ClusterError(RuntimeError):
    """A local cluster could not be started or stopped; the message says why."""


class AlreadyRunning(ClusterError):
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        super().__init__(f"a local cluster is already running (Ray {cluster.ray_address}, dashboard "
                         f"{cluster.dashboard_url}, MLflow {cluster.mlflow_uri}; state {state.state_path()}); "
                         "`bitlm cluster down --local` stops it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    """The `ray` script of this interpreter's environment (the head must run our ray, torch and bitlm)."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed next to this Python (pip install 'ray[default]')")
    return found


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    """Serialise `up` and `down` on one home (two `up --local` at once start one cluster)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ray_env(auth_mode: str, mlflow_uri: str, gcs_port: int) -> dict[str, str]:
    """The head's environment, which its workers and job drivers inherit."""
    env = dict(os.environ, RAY_AUTH_MODE=auth_mode, RAY_USAGE_STATS_ENABLED="0", MLFLOW_TRACKING_URI=mlflow_uri)
    # processes of this cluster that look their cluster up (Ray Train's placement-group cleaner uses
    # the state API with no address) find this one, not "multiple active Ray instances" on the machine
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    # a job's `python` is this environment's, with the project's ray, torch and bitlm
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # a spot-instance feature; noise on a laptop
    # on SIGTERM the head drains for up to 30 s by default (seen to run out after a training job);
    # nothing here migrates to another node, so `down` does not wait that long
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")
    return env


def start(*, num_cpus: int, num_gpus: int = 0, timeout_s: float = 180,
          echo: Callable[[str], None] = lambda line: None) -> LocalCluster:
    """Start a Ray head and an MLflow server, wait until both answer, record them; AlreadyRunning if one runs."""
    home = state.home()
    with locked(home):
        existing = state.read()
        if existing is not None and existing.running():
            raise AlreadyRunning(existing)
        if existing is not None:  # a crashed or half-stopped cluster: finish stopping it first
            echo("clearing a stale local cluster record (its head is gone)")
            stop(existing)
            state.remove()
        gcs_port, dashboard_port = free_port(), free_port()
        temp_dir = Path("/tmp") / f"bitlm-{os.getuid()}-{gcs_port}"
        if len(str(temp_dir)) + _RAY_SOCKET_SUFFIX > SOCKET_PATH_MAX:
            raise ClusterError(f"Ray's temp dir {temp_dir} is too long for its socket paths")
        logs = home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cluster = LocalCluster(ray_address="", dashboard_url=f"http://127.0.0.1:{dashboard_port}", mlflow_uri="",
                               temp_dir=str(temp_dir), home=str(home), num_cpus=num_cpus)
        deadline = time.monotonic() + timeout_s
        try:
            echo(f"starting MLflow and Ray (dashboard {cluster.dashboard_url}) ...")
            # MLflow first and bound before Ray starts: Ray takes random free ports as it comes up
            _start_mlflow(cluster, home / "mlflow", logs / "mlflow.log", deadline)
            head = _spawn([ray_executable(), "start", "--head", "--block", f"--port={gcs_port}",
                           "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                           # every port Ray would otherwise take at a fixed default, which another Ray may hold
                           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                           f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                           f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                          ray_env(cluster.auth_mode, cluster.mlflow_uri, gcs_port), logs / "ray-head.log")
            cluster.processes.append(Process.of("ray start --head", head.pid, group_leader=True))
            cluster.ray_address = _wait_ray_address(temp_dir, head, logs / "ray-head.log", deadline)
            _wait_job_api(cluster, head, logs / "ray-head.log", deadline)
        except BaseException:
            stop(cluster)
            raise
        for leader in cluster.leaders():
            cluster.processes += [Process.of(_name(pid), pid) for pid in group_members(leader.pid) if pid != leader.pid]
        state.write(cluster)
        return cluster


def _start_mlflow(cluster: LocalCluster, directory: Path, log: Path, deadline: float, attempts: int = 3) -> None:
    """`mlflow server --workers 1` on a free port (another if that one is taken meanwhile); waits for /health."""
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        port, offset = free_port(), log.stat().st_size if log.exists() else 0
        process = _spawn([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
                          "--artifacts-destination", str(directory / "artifacts")],
                         dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), log)
        cluster.processes.append(Process.of("mlflow server", process.pid, group_leader=True))
        cluster.mlflow_uri = f"http://127.0.0.1:{port}"
        try:
            _wait_http(f"{cluster.mlflow_uri}/health", process, log, deadline)
            return
        except ClusterError:
            with open(log, "rb") as text:
                text.seek(offset)
                taken = b"address already in use" in text.read()
            if not taken or attempt == attempts - 1:
                raise
            cluster.processes.pop()  # it exited: nothing of it is left to stop


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # its own session: the terminal's Ctrl-C does not reach it, and its group holds all it starts
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(log.parent))


def _died(process: subprocess.Popen, log: Path) -> ClusterError:
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.exists() else []
    return ClusterError(f"{' '.join(process.args[:3])} exited with status {process.returncode}; "
                        f"the end of {log}:\n" + "\n".join(tail))


def _wait_http(url: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise _died(process, log)
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"{url} did not answer in time; see {log}")
        time.sleep(0.3)


def _wait_ray_address(temp_dir: Path, head: subprocess.Popen, log: Path, deadline: float) -> str:
    """The GCS address the head writes into <temp dir>/ray_current_cluster once it is up."""
    marker = temp_dir / "ray_current_cluster"
    while True:
        if head.poll() is not None:
            raise _died(head, log)
        if marker.exists() and marker.read_text().strip():
            return marker.read_text().strip()
        if time.monotonic() > deadline:
            raise ClusterError(f"the Ray head did not come up in time; see {log}")
        time.sleep(0.3)


def _wait_job_api(cluster: LocalCluster, head: subprocess.Popen, log: Path, deadline: float) -> None:
    """Wait until the job API answers: the dashboard listens before its job agent is ready."""
    from .jobs import job_client

    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise _died(head, log)
        try:
            job_client(cluster.dashboard_url, cluster.auth_mode).list_jobs()
            return
        except Exception as err:  # ConnectionError, RuntimeError("No available agent ...")
            last = err
            time.sleep(0.5)
    raise ClusterError(f"the Ray job API at {cluster.dashboard_url} did not answer in time ({last}); see {log}")


def _name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    name = Path(words[0]).name
    if name.startswith("python"):  # name it by its module or script
        for i, word in enumerate(words[1:], 1):
            if word == "-m" and i + 1 < len(words):
                return f"python -m {words[i + 1]}"
            if word.endswith(".py"):
                return f"python {Path(word).name}"
    return name[:60]


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is `pgid` (from /proc; [] where there is no /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


def _ours(cluster: LocalCluster) -> list[Process]:
    """Every live process of the cluster: recorded ones, and members of groups whose leader is ours."""
    found = {p.pid: p for p in cluster.processes if p.alive()}
    for leader in cluster.leaders():
        # a group id is the leader's PID, which the kernel does not hand out while the group has members;
        # only a PID now held by another program (a different start time) means the group is not ours
        if not leader.alive() and state.start_ticks(leader.pid) is not None:
            continue
        for pid in group_members(leader.pid):
            found.setdefault(pid, Process.of(_name(pid), pid))
    return [p for p in found.values() if p.alive()]


def stop(cluster: LocalCluster, timeout_s: float = 30, grace_s: float = 5) -> list[Process]:
    """SIGTERM the group leaders (each stops what it started) and wait for them; then SIGTERM what of
    ours outlived its leader, and SIGKILL whatever is left after `grace_s`.

    Returns the processes that were running when called.
    """
    running = _ours(cluster)
    leaders = [p for p in cluster.leaders() if p.alive()]
    _signal(leaders, signal.SIGTERM)
    _wait_gone(leaders, timeout_s)
    _signal([p for p in running if p.alive()], signal.SIGTERM)
    _wait_gone(running, grace_s)
    _signal([p for p in running if p.alive()], signal.SIGKILL)
    _signal(_ours(cluster), signal.SIGKILL)  # started while we waited (a worker Ray was spawning)
    if cluster.temp_dir.startswith("/tmp/bitlm-"):
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return running


def _signal(processes: list[Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _wait_gone(processes: list[Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.alive() for p in processes):
        time.sleep(0.2)

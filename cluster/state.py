"""The state file of `bitlm cluster up --local`: addresses and the processes it started.

One JSON file, `$BITLM_CLUSTER_HOME/local.json` (default `~/.bitlm/cluster/local.json`), written
atomically by `up --local` and removed by `down --local`. A process is recorded with its start
time (from /proc), so a PID the kernel has since given to another program is never taken for
ours: it is neither reported alive nor signalled.

`recorded_addresses()` is what `bitlm train/tune/serve` and `pipelines.train` consult when no
address is given: the addresses of a recorded cluster whose head is still running, else {}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HOME_ENV = "BITLM_CLUSTER_HOME"
STATE_NAME = "local.json"


def home() -> Path:
    """Where the local cluster keeps its state file, logs and MLflow store."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".bitlm" / "cluster").expanduser().resolve()


def state_path() -> Path:
    return home() / STATE_NAME


def start_ticks(pid: int) -> Optional[int]:
    """The process' start time in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its closing one
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def process_group(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@dataclass
class Process:
    """One process we started (a group leader) or found among its descendants at start-up."""

    name: str
    pid: int
    start_ticks: Optional[int] = None
    group_leader: bool = False  # started by us in its own session: its PID is its group's id

    @classmethod
    def of(cls, name: str, pid: int, group_leader: bool = False) -> "Process":
        return cls(name=name, pid=pid, start_ticks=start_ticks(pid), group_leader=group_leader)

    def alive(self) -> bool:
        """True while this very process runs (same PID and start time), zombies excluded."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if self.start_ticks is not None and start_ticks(self.pid) != self.start_ticks:
            return False
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True  # no /proc (not Linux): kill(0) is all we know


@dataclass
class LocalCluster:
    """A local Ray head and MLflow server started by `bitlm cluster up --local`."""

    ray_address: str  # GCS address, for ray.init(address=...) and `ray status --address`
    dashboard_url: str  # Ray dashboard and job API (JobSubmissionClient)
    mlflow_uri: str  # MLflow tracking server (HTTP)
    temp_dir: str  # Ray's --temp-dir (sessions, logs, sockets)
    home: str  # state file, logs, MLflow store and artifacts
    auth_mode: str = "token"  # RAY_AUTH_MODE of the head; clients need the same
    num_cpus: int = 0
    started_at: float = field(default_factory=time.time)
    processes: list[Process] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LocalCluster":
        data = json.loads(text)
        data["processes"] = [Process(**p) for p in data.get("processes", [])]
        return cls(**data)

    def leaders(self) -> list[Process]:
        return [p for p in self.processes if p.group_leader]

    def running(self) -> bool:
        """True while every process group we started still has its leader."""
        leaders = self.leaders()
        return bool(leaders) and all(p.alive() for p in leaders)

    def addresses(self) -> dict[str, str]:
        return {"ray": self.ray_address, "dashboard": self.dashboard_url, "mlflow": self.mlflow_uri}


def read(path: Optional[Path] = None) -> Optional[LocalCluster]:
    """The recorded local cluster, or None when there is no state file (an unreadable one is an error)."""
    path = path or state_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LocalCluster.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path} is not a bitlm cluster state file ({err}); remove it if no cluster runs") from None


def write(cluster: LocalCluster, path: Optional[Path] = None) -> Path:
    """Write the state file atomically (a reader sees the old file or the new one, never half)."""
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(cluster.to_json())
    os.replace(tmp, path)
    return path


def remove(path: Optional[Path] = None) -> None:
    (path or state_path()).unlink(missing_ok=True)


def recorded_addresses() -> dict[str, str]:
    """{"ray", "dashboard", "mlflow"} of the recorded local cluster if its head runs, else {}.

    A caller that joins the cluster also needs the head's auth mode: `use_auth_mode` sets it for
    this process.
    """
    try:
        cluster = read()
    except ValueError:
        return {}
    if cluster is None or not cluster.running():
        return {}
    use_auth_mode(cluster.auth_mode)
    return cluster.addresses()


def use_auth_mode(mode: str) -> None:
    """Talk to a head started with RAY_AUTH_MODE=mode from this process (a RAY_AUTH_MODE already set wins).

    Ray reads the mode into its config once, when first imported; if ray is loaded already, that
    config is refreshed (private API of ray 2.60), or the connection is refused as unauthenticated.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = mode
    if "ray" in sys.modules:
        try:
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass

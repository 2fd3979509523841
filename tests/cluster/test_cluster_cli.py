"""`bitlm cluster` without starting Ray: the state file, what `down` signals, the cloud checks, job commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bitlm.cli import main
from cluster import cloud, jobs, state
from cluster.state import LocalCluster, Process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(state.HOME_ENV, str(tmp_path / "home"))
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "home"


@pytest.fixture
def spawned():
    """Start `sleep` processes (optionally group leaders with a child); all are killed at the end."""
    started: list[subprocess.Popen] = []

    def spawn(leader: bool = False) -> subprocess.Popen:
        # a leader runs a child sleep, like `ray start --block` runs the raylet
        argv = ["bash", "-c", "sleep 300 & wait"] if leader else ["sleep", "300"]
        process = subprocess.Popen(argv, start_new_session=leader)
        started.append(process)
        return process

    yield spawn
    for process in started:
        try:  # a leader's child sleep too
            os.killpg(process.pid, signal.SIGKILL) if process.pid == os.getpgid(process.pid) else process.kill()
        except ProcessLookupError:
            pass
        process.wait()


def _fake_cluster(*leaders: subprocess.Popen) -> LocalCluster:
    time.sleep(0.3)  # the leaders' children exist
    return LocalCluster(ray_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2", mlflow_uri="http://127.0.0.1:3",
                        temp_dir="/nonexistent", home="/nonexistent",
                        processes=[Process.of(f"leader {p.pid}", p.pid, group_leader=True) for p in leaders])


def _run(*args: str):
    return CliRunner().invoke(main, ["cluster", *args], catch_exceptions=False)


def test_a_process_is_ours_only_with_its_recorded_start_time():
    me = Process.of("me", os.getpid())
    assert me.alive()
    assert not Process(name="me", pid=os.getpid(), start_ticks=(me.start_ticks or 0) + 1).alive()
    done = subprocess.Popen(["true"])
    done.wait()
    assert not Process(name="gone", pid=done.pid).alive()


def test_state_round_trips_and_a_dead_head_is_not_a_cluster(home, spawned):
    leader = spawned(leader=True)
    cluster = _fake_cluster(leader)
    state.write(cluster)
    assert state.read() == cluster
    assert state.recorded_addresses() == {"ray": "127.0.0.1:1", "dashboard": "http://127.0.0.1:2",
                                          "mlflow": "http://127.0.0.1:3"}
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    assert state.recorded_addresses() == {}


def test_address_order_is_flag_then_environment_then_recorded_cluster_then_local(home, spawned, monkeypatch):
    from pipelines.train import ray_address

    assert ray_address(None) == "local"
    state.write(_fake_cluster(spawned(leader=True)))
    assert ray_address(None) == "127.0.0.1:1"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert ray_address(None) == "10.0.0.9:6379"
    assert ray_address("auto") == "auto"


def test_bitlm_commands_take_the_recorded_cluster_as_their_default(home, spawned, monkeypatch):
    state.write(_fake_cluster(spawned(leader=True)))
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:1" and os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:3"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////mine.db")
    CliRunner().invoke(main, ["train", "--help"])
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////mine.db"  # a set variable wins


def test_down_stops_the_recorded_groups_and_nothing_else(home, spawned):
    first, second, bystander = spawned(leader=True), spawned(leader=True), spawned()
    cluster = _fake_cluster(first, second)
    # a PID of another program recorded by mistake (another start time) is never signalled
    cluster.processes.append(Process(name="reused pid", pid=bystander.pid, start_ticks=1))
    members = [pid for p in (first, second) for pid in _group(p.pid)]
    assert len(members) == 4
    state.write(cluster)
    result = _run("down", "--local")
    assert result.exit_code == 0, result.output
    assert "stopped the local cluster: 4 running process(es)" in result.output
    time.sleep(0.2)
    assert all(not _running(pid) for pid in members)
    assert bystander.poll() is None
    assert state.read() is None


def _group(pgid: int) -> list[int]:
    from cluster.local import group_members

    return group_members(pgid)


def _running(pid: int) -> bool:
    return Process(name="?", pid=pid).alive()


def test_up_refuses_a_second_local_cluster_while_one_runs(home, spawned):
    state.write(_fake_cluster(spawned(leader=True)))
    result = _run("up", "--local")
    assert result.exit_code == 1
    assert "a local cluster is already running" in result.output and "bitlm cluster down --local" in result.output


def test_status_and_job_commands_without_a_cluster_say_how_to_start_one(home):
    for args in (("status",), ("jobs",), ("submit", "--", "python", "-c", "pass"), ("logs", "raysubmit_x")):
        result = _run(*args)
        assert result.exit_code == 1, args
        assert "bitlm cluster up --local" in result.output, args


def test_up_needs_local_or_a_config(home):
    assert _run("up").exit_code == 2
    assert _run("up", "--local", "--config", "aws-gpu").exit_code == 2


def _config(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "cluster" / "configs" / "aws-gpu.yaml").read_text())
    text = yaml.safe_dump(config).replace("CHANGE-ME", "example")
    config = yaml.safe_load(text)
    config.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("args, message", [
    (("up", "--config", "no-such-cluster"), "cluster config 'no-such-cluster' not found"),
    (("up", "--config", "aws-gpu"), "edit the CHANGE-ME values first"),
    (("down", "--config", "gcp-gpu"), "provider.project_id is not set"),
])
def test_cloud_commands_fail_on_a_config_before_contacting_anything(home, args, message):
    result = _run(*args)
    assert result.exit_code == 1 and message in result.output
    assert not (home / "rendered").exists()  # nothing was rendered, so `ray up` never ran


def test_an_unknown_provider_fails_naming_it_and_the_file(home, tmp_path):
    path = _config(tmp_path, provider={"type": "nimbus", "region": "x"})
    result = _run("status", "--config", str(path))
    assert result.exit_code == 1
    assert "provider.type 'nimbus' is not supported" in result.output and str(path) in result.output


def test_a_missing_file_the_config_references_fails_naming_it(home, tmp_path):
    path = _config(tmp_path, file_mounts={"/remote/data": str(tmp_path / "absent")})
    result = _run("up", "--config", str(path))
    assert result.exit_code == 1 and f"{tmp_path / 'absent'}, which does not exist" in result.output


@pytest.mark.skipif(cloud.importlib.util.find_spec("boto3") is not None, reason="boto3 is installed here")
def test_a_missing_cloud_sdk_fails_with_the_extra_to_install(home, tmp_path):
    result = _run("up", "--config", str(_config(tmp_path)))
    assert result.exit_code == 1
    assert "the AWS SDK (boto3) is not installed" in result.output and "bitlm[aws]" in result.output
    assert not (home / "rendered").exists()


@pytest.mark.parametrize("kind, files, env", [
    ("aws", [".aws/credentials"], {}),
    ("aws", [], {"AWS_PROFILE": "research"}),
    ("gcp", [".config/gcloud/application_default_credentials.json"], {}),
])
def test_credentials_are_found_in_the_sdks_files_or_environment(tmp_path, kind, files, env):
    with pytest.raises(cloud.ConfigError, match=f"no {kind.upper()} credentials found"):
        cloud.check_credentials(kind, env={}, home=tmp_path)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    cloud.check_credentials(kind, env=env, home=tmp_path)


def test_submit_appends_config_and_overrides_to_the_entrypoint(tmp_path):
    config = tmp_path / "runs" / "c.json"
    config.parent.mkdir()
    config.write_text("{}")
    command = jobs.build_entrypoint([], tmp_path, str(config), ["train.max_steps=3"], defaults=["run.storage_path=/s"])
    assert command == ("python -m pipelines.train --config runs/c.json --set run.storage_path=/s "
                       "--set train.max_steps=3")
    assert jobs.build_entrypoint(["python", "-c", "print('a b')"], tmp_path, None, []) == \
        "python -c 'print('\"'\"'a b'\"'\"')'"
    with pytest.raises(jobs.JobError, match="outside the working dir"):
        jobs.build_entrypoint([], tmp_path / "runs" / "x", str(config), [])
    with pytest.raises(jobs.JobError, match="expected KEY=VALUE"):
        jobs.build_entrypoint([], tmp_path, None, ["oops"])


def test_the_job_gets_the_project_minus_what_it_never_needs_and_the_mlflow_uri():
    env = jobs.runtime_env(REPO, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert env["working_dir"] == str(REPO)
    assert {"runs", "data", "mlruns", "mlflow.db", "*.safetensors"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_ray_info_lines_are_dropped_from_job_logs(monkeypatch):
    monkeypatch.delenv("BITLM_VERBOSE", raising=False)
    log = "2026-12-02 17:06:05,359\tINFO job_manager.py:581 -- Runtime env is setting up.\nstep 6: val/bpb 8.6\n"
    assert jobs.without_ray_info(log) == "step 6: val/bpb 8.6\n"
    monkeypatch.setenv("BITLM_VERBOSE", "1")
    assert jobs.without_ray_info(log) == log


@pytest.mark.parametrize("command", ["up", "down", "status", "submit", "logs", "jobs"])
def test_every_command_explains_itself(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert len(result.output.split("Options:")[0].split()) > 12


def test_cluster_group_is_listed_by_bitlm_and_imported_only_when_used():
    code = ("import sys, bitlm.cli; print('cluster.cli' in sys.modules, 'ray' in sys.modules, "
            "'cluster' in bitlm.cli.main.list_commands(None))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.split() == ["False", "False", "True"], done.stderr
    assert "cluster" in json.dumps(CliRunner().invoke(main, ["--help"]).output)

"""Console quieting: which forwarded framework lines are noise, and that verbose turns quieting off."""

from __future__ import annotations

import logging

import pytest

from bitlm.cli import console

# Lines copied from a `bitlm demo` console before quieting (Ray 2.60, MLflow 3.17).
NOISE = [
    "INFO 2026-12-02 12:15:55,279 proxy 192.0.2.2 -- Proxy starting on node 2e45 (HTTP port: 53073).",
    "INFO 2026-12-02 12:15:58,730 bitlm-demo_BitLMServer 2j8np118 95d8 -- POST /v1/generate 200 163.2ms",
    "2026/12/02 12:15:47 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "2026/12/02 12:15:24 INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring system metrics.",
    "[2026-12-02 12:15:21,667 E 4102 4131] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID",
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will be retried.",
]
KEPT = [
    "step 100: val/bpb 4.3432  K 0.507  C 0.775  S 0.799",
    "WARNING 2026-12-02 12:15:55,279 controller 44 -- Deployment 'BitLMServer' has 1 replicas that have taken more",
    "ERROR 2026-12-02 12:15:55,279 bitlm_BitLMServer x y -- Exception in replica",
    "Traceback (most recent call last):",
    "2026/12/02 12:15:47 WARNING mlflow.utils: Failed to log metrics",
    "RuntimeError: injected failure at step 3 (run.fail_at_step)",
]


@pytest.mark.parametrize("line", NOISE)
def test_framework_chatter_is_noise(line):
    assert console.is_noise(line)


@pytest.mark.parametrize("line", KEPT)
def test_our_lines_warnings_and_errors_are_kept(line):
    assert not console.is_noise(line)


def test_drop_noise_keeps_order_of_the_rest():
    assert console.drop_noise([NOISE[0], KEPT[0], NOISE[2], KEPT[3]]) == [KEPT[0], KEPT[3]]


def test_verbose_env_turns_quieting_off(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    console.quiet()
    import os

    assert "MLFLOW_LOGGING_LEVEL" not in os.environ


@pytest.mark.parametrize("value, verbose", [("", False), ("0", False), ("false", False), ("1", True), ("yes", True)])
def test_is_verbose_reads_the_environment(monkeypatch, value, verbose):
    monkeypatch.setenv(console.VERBOSE_ENV, value)
    assert console.is_verbose() is verbose


def test_driver_noise_filter_drops_token_notice_only():
    noise_filter = console._DriverNoiseFilter()

    def record(message, level=logging.WARNING):
        return logging.LogRecord("ray", level, __file__, 1, message, None, None)

    assert not noise_filter.filter(record("Token authentication is enabled for this Ray cluster. Set ..."))
    assert noise_filter.filter(record("Some real Ray warning about resources"))

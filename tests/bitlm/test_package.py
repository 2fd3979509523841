"""The bitlm package boundary: no orchestration imports, and a public API that exists."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bitlm

PACKAGE_DIR = Path(bitlm.__file__).resolve().parent
FORBIDDEN = ("ray", "mlflow", "pipelines", "tune", "serve", "cluster")
FORBIDDEN_IMPORT = re.compile(r"^\s*(import|from)\s+(" + "|".join(FORBIDDEN) + r")\b", re.MULTILINE)


def _library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "cli" not in p.relative_to(PACKAGE_DIR).parts[:-1])


@pytest.fixture(scope="module")
def loaded_after_import():
    """What a fresh interpreter holds of bitlm, bitlm.cli, ray, mlflow after `import bitlm`, then `import bitlm.cli`."""
    snap = "json.dumps({m: m in sys.modules for m in ('bitlm', 'bitlm.cli', 'ray', 'mlflow')})"
    code = f"import json, sys; import bitlm; print({snap}); import bitlm.cli; print({snap})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    after_bitlm, after_cli = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    return after_bitlm, after_cli


def test_import_bitlm_leaves_ray_and_mlflow_unloaded(loaded_after_import):
    after_bitlm, _ = loaded_after_import
    assert after_bitlm == {"bitlm": True, "bitlm.cli": False, "ray": False, "mlflow": False}


def test_import_bitlm_cli_leaves_ray_and_mlflow_unloaded(loaded_after_import):
    # The CLI reaches the orchestration layers only lazily, inside commands.
    _, after_cli = loaded_after_import
    assert after_cli == {"bitlm": True, "bitlm.cli": True, "ray": False, "mlflow": False}


def test_forbidden_import_pattern_matches_what_it_should():
    # Guards the scan below against a regex that matches nothing.
    hits = ["import ray", "from mlflow import log_param", "    import tune.search", "from pipelines.x import y",
            "import serve", "\tfrom cluster import a"]
    misses = ["import rayon", "from bitlm.tune import x", "# import ray", "x = 'import ray'", "import mlflowx"]
    assert all(FORBIDDEN_IMPORT.search(line) for line in hits)
    assert not any(FORBIDDEN_IMPORT.search(line) for line in misses)


def test_library_modules_do_not_import_orchestration_layers():
    modules = _library_modules()
    assert PACKAGE_DIR / "config.py" in modules and PACKAGE_DIR / "engine.py" in modules
    assert not any("cli" in p.relative_to(PACKAGE_DIR).parts for p in modules)
    offenders = {str(p.relative_to(PACKAGE_DIR)): [m.group(0).strip() for m in FORBIDDEN_IMPORT.finditer(p.read_text())]
                 for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_public_name_exists():
    missing = [name for name in bitlm.__all__ if not hasattr(bitlm, name)]
    assert missing == []


def test_public_names_are_unique():
    assert len(bitlm.__all__) == len(set(bitlm.__all__))


def test_star_import_exposes_exactly_all():
    namespace: dict = {}
    exec("from bitlm import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(bitlm.__all__)


def test_version_is_a_dotted_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", bitlm.__version__)

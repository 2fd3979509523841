"""The Dockerfile, without Docker: it parses into instructions, its base is Ray's CUDA image of the
pinned ray, every COPY source exists and is not dropped by .dockerignore, and `make image` tags it."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        if keyword.upper() not in INSTRUCTIONS or keyword != keyword.upper():
            raise ValueError(f"not a Dockerfile instruction: {whole[:60]!r}")
        instructions.append((keyword, args.strip()))
    if pending:
        raise ValueError("the last instruction ends with a continuation")
    return instructions


def _instructions() -> list[tuple[str, str]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def _pinned_ray() -> str:
    return re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def _copy_sources(args: str) -> list[str]:
    words = json.loads(args) if args.startswith("[") else args.split()
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def test_dockerfile_parses_into_instructions_starting_from_one_base():
    instructions = _instructions()
    assert instructions[0][0] == "FROM"
    assert [k for k, _ in instructions].count("FROM") == 1
    assert {"COPY", "RUN", "WORKDIR"} <= {k for k, _ in instructions}


def test_parser_refuses_what_is_not_a_dockerfile():
    import pytest

    with pytest.raises(ValueError):
        parse_dockerfile("FROM x\nRUNN echo\n")
    with pytest.raises(ValueError):
        parse_dockerfile("FROM x\nRUN echo \\\n")


def test_base_image_is_rays_cuda_python311_image_of_the_pinned_and_installed_ray():
    (base,) = [args for keyword, args in _instructions() if keyword == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu(\d+)", base)
    assert match, base
    assert match.group(1) == _pinned_ray() == ray.__version__
    assert match.group(2) == "128"  # CUDA 12.8.1 is in Ray's image build matrix for Python 3.11


def test_every_copy_source_exists_and_survives_dockerignore():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [s for keyword, args in _instructions() if keyword == "COPY" for s in _copy_sources(args)]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    # what `pip install .` builds from: the packages the wheel includes, the readme and licence files
    for needed in ("pyproject.toml", "README.md", "LICENSE", "bitlm", "pipelines", "serve", "tune", "cluster"):
        assert needed in sources, needed


def test_project_is_installed_with_pip_without_replacing_the_images_ray():
    runs = " ".join(args for keyword, args in _instructions() if keyword == "RUN")
    assert "pip install --no-cache-dir -c /tmp/ray-constraint.txt ." in runs
    assert "print('ray==' + ray.__version__)" in runs and "> /tmp/ray-constraint.txt" in runs
    assert f"ray.__version__ == '{_pinned_ray()}'" in runs
    assert not re.search(r"pip install[^&]*\bray\b[=\[]", runs)  # ray itself is never installed


def test_make_image_tags_the_image_with_the_pinned_ray():
    done = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"docker build -t bitlm:{_pinned_ray()}-py311-cu128 ." in done.stdout

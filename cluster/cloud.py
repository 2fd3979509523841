"""Cloud clusters: check a launcher config before anything is contacted, then run `ray up/down/exec`.

The checks, in order, each one line naming the file or the missing piece: the config file exists
(a name means cluster/configs/NAME.yaml), it parses, its provider is one bitlm ships configs for,
the local files it references exist, no CHANGE-ME placeholder is left, the provider's SDK is
installed, and credentials are configured (looked up in the environment and the SDK's files
only: no request is made).

`bitlm cluster up` runs a rendered copy: the image from BITLM_IMAGE if set, and an env file
(~/.bitlm-env on every node, sourced by the set-up and start commands) holding the MLflow store
settings forwarded from this environment and the cluster's Ray auth token.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# provider type -> (module the launcher imports, pip package, extra of bitlm)
PROVIDERS = {
    "aws": ("boto3", "boto3", "aws"),
    "gcp": ("googleapiclient", "google-api-python-client", "gcp"),
}
# read by the head's MLflow server; forwarded from this environment by `bitlm cluster up`
FORWARDED_ENV = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION")
ENV_FILE = "~/.bitlm-env"
PLACEHOLDER = "CHANGE-ME"


class ConfigError(ValueError):
    """A cluster config that cannot be used as it is; the message names the file and the fix."""


def resolve(config: str) -> Path:
    """A path as given, else cluster/configs/<name>.yaml."""
    path = Path(config).expanduser()
    if path.is_file():
        return path.resolve()
    if "/" not in config and not config.endswith((".yaml", ".yml")):
        named = CONFIGS_DIR / f"{config}.yaml"
        if named.is_file():
            return named
    shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"cluster config {config!r} not found (a YAML file, or one of: {shipped})")


def load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a cluster config is a mapping (cluster_name, provider, ...)")
    return config


def provider_type(config: Mapping[str, Any], path: Path) -> str:
    provider = config.get("provider")
    kind = provider.get("type") if isinstance(provider, dict) else None
    if kind not in PROVIDERS:
        raise ConfigError(f"{path}: provider.type {kind!r} is not supported by `bitlm cluster` "
                          f"(one of: {', '.join(PROVIDERS)}; Kubernetes goes through cluster/kuberay/)")
    return kind


def check_files(config: Mapping[str, Any], path: Path) -> None:
    """The local files the launcher would copy or use: file_mounts sources and the SSH key."""
    mounts = config.get("file_mounts") or {}
    for remote, local in mounts.items():
        if not Path(str(local)).expanduser().exists():
            raise ConfigError(f"{path}: file_mounts[{remote!r}] names {local}, which does not exist here")
    key = (config.get("auth") or {}).get("ssh_private_key")
    if key and not Path(key).expanduser().is_file():
        raise ConfigError(f"{path}: auth.ssh_private_key {key} does not exist")
    if config["provider"]["type"] == "gcp" and not config["provider"].get("project_id"):
        raise ConfigError(f"{path}: provider.project_id is not set (your GCP project's id)")


def check_sdk(kind: str) -> None:
    module, package, extra = PROVIDERS[kind]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"the {kind.upper()} SDK ({package}) is not installed, and `ray up` needs it: "
                          f"pip install 'bitlm[{extra}]'")


def check_credentials(kind: str, env: Optional[Mapping[str, str]] = None, home: Optional[Path] = None) -> None:
    """Credentials as the SDK would find them without a network request; ConfigError when there are none."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    if kind == "aws":
        found = (any(env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                           "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"))
                 or Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials").is_file()
                 or Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config").is_file())
        hint = "run `aws configure` (or set AWS_PROFILE / AWS_ACCESS_KEY_ID)"
    else:
        gcloud = Path(env.get("CLOUDSDK_CONFIG") or home / ".config" / "gcloud")
        found = (bool(env.get("GOOGLE_APPLICATION_CREDENTIALS"))
                 and Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).is_file()) or \
            (gcloud / "application_default_credentials.json").is_file()
        hint = "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)"
    if not found:
        raise ConfigError(f"no {kind.upper()} credentials found; {hint}")


def check_placeholders(config: Mapping[str, Any], path: Path) -> None:
    """Refuse a config that still holds a CHANGE-ME value (an image, a file system, a project)."""
    import yaml

    found = sorted({line.strip() for line in yaml.safe_dump(dict(config)).splitlines() if PLACEHOLDER in line})
    if found:
        raise ConfigError(f"{path}: edit the {PLACEHOLDER} values first: " + "; ".join(found)[:600])


def preflight(config: str, *, env: Optional[Mapping[str, str]] = None,
              credentials: bool = True) -> tuple[Path, dict[str, Any]]:
    """Every check above, before anything is contacted (on the config as `up` renders it); returns its path
    and its contents as written."""
    env = os.environ if env is None else env
    path = resolve(config)
    loaded = load(path)
    kind = provider_type(loaded, path)
    rendered = render(loaded, env)
    check_files(rendered, path)
    check_placeholders(rendered, path)
    check_sdk(kind)
    if credentials:
        check_credentials(kind, env)
    return path, loaded


def render(config: Mapping[str, Any], env: Mapping[str, str], token: Optional[str] = None) -> dict[str, Any]:
    """What `bitlm cluster up` runs: BITLM_IMAGE as the image, and on every node, before its set-up, an env
    file with the FORWARDED_ENV values of `env` and the cluster's Ray auth token (when one is given)."""
    lines = [f"export {k}={shlex.quote(env[k])}" for k in FORWARDED_ENV if env.get(k)]
    if token:
        lines += ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN={shlex.quote(token)}"]
    write = (f"printf '%s\\n' {' '.join(shlex.quote(line) for line in lines)} > {ENV_FILE}; chmod 600 {ENV_FILE}"
             if lines else f": > {ENV_FILE}")
    rendered = copy.deepcopy(dict(config))
    rendered["setup_commands"] = [write, *(config.get("setup_commands") or [])]
    if env.get("BITLM_IMAGE"):
        rendered.setdefault("docker", {})["image"] = env["BITLM_IMAGE"]
    return rendered


def cluster_token(directory: Path, name: str) -> str:
    """The Ray auth token of cluster `name`: made once, kept in <directory>/<name>.token (mode 600)."""
    import secrets

    path = directory / f"{name}.token"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def write_rendered(config: dict[str, Any], source: Path, directory: Path) -> Path:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / source.name
    target.write_text(f"# rendered by `bitlm cluster up` from {source}\n" + yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)  # it may hold a database URI with a password
    return target


def ray_command(ray: str, *args: str) -> int:
    """Run a `ray` CLI command with the terminal attached (its prompts and progress are the user's)."""
    return subprocess.run([ray, *args]).returncode

"""Config keys renamed or moved since earlier versions, so old config files, checkpoints and `--set` keep working."""

from __future__ import annotations

import copy
import functools
from typing import Any

# fields renamed inside their section (counts start with n_, units are in names): section -> {old: new}
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "model": {"local_layers": "n_local_layers", "max_seq_len": "max_positions"},
    "train": {"eval_batches": "n_eval_batches", "keep_checkpoints": "n_checkpoints_kept",
              "log_every": "log_every_steps", "eval_every": "eval_every_steps",
              "checkpoint_every": "checkpoint_every_steps"},
    "scaling": {"add_layers": "n_added_layers", "window": "n_plateau_evals"},
}

# old dotted key -> its dotted key now
LEGACY_KEYS: dict[str, str] = {
    "model.checkpoint_activations": "parallel.activation_checkpointing",
    "run.strategy": "parallel.strategy",
    "run.n_microbatches": "parallel.n_microbatches",
    "run.pipeline_schedule": "parallel.pipeline_schedule",
} | {f"{section}.{old}": f"{section}.{new}" for section, names in RENAMED_FIELDS.items() for old, new in names.items()}


def accepts_old_names(section: str):
    """Class decorator of a config dataclass: its renamed fields' old names still work as keyword
    arguments (dataclasses.replace included) and as read-only attributes."""
    renamed = RENAMED_FIELDS[section]

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:  # given by its old name; dataclasses.replace passes the current value too
                    kwargs[new] = kwargs.pop(old)
            init(self, **kwargs)

        cls.__init__ = __init__
        for old, new in renamed.items():
            setattr(cls, old, property(lambda self, _new=new: getattr(self, _new), doc=f"Old name of {new}."))
        return cls

    return decorate


def current_key(key: str) -> str:
    """The dotted key an assignment to `key` means today."""
    return LEGACY_KEYS.get(key, key)


def upgrade_document(data: Any, prefix: str = "") -> Any:
    """A copy of a config document (the fields of the section at `prefix`) with legacy keys renamed or moved.

    A key moved to another section is moved there when the document holds that section's level
    (a whole experiment), and dropped from a lone section (a checkpoint's model config carries no
    execution options). A key given under both its old and its new name keeps the new one.
    """
    if not isinstance(data, dict) or not any(old.startswith(prefix) for old in LEGACY_KEYS):
        return data
    data = copy.deepcopy(data)
    for old, new in LEGACY_KEYS.items():
        if not old.startswith(prefix):
            continue
        old_path = old[len(prefix):].split(".")
        parent = _section(data, old_path[:-1], create=False)
        if parent is None or old_path[-1] not in parent:
            continue
        value = parent.pop(old_path[-1])
        if not parent and len(old_path) > 1:  # a section left empty by the move (a `run` of only old keys)
            _section(data, old_path[:-2], create=False).pop(old_path[-2])
        if not new.startswith(prefix):
            continue  # moved out of this lone section
        new_path = new[len(prefix):].split(".")
        target = _section(data, new_path[:-1], create=True)
        if target is not None:
            target.setdefault(new_path[-1], value)
    return data


def _section(data: dict, path: list[str], *, create: bool):
    node = data
    for name in path:
        if name not in node and create:
            node[name] = {}
        node = node.get(name)
        if not isinstance(node, dict):
            return None
    return node

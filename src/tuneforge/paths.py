"""What a path in a config means: one rule for run configs (``tuneforge train``) and eval configs (``--config``).

    Paths written in a config file are relative to the folder of that file; paths given on the command line
    (``key=value`` overrides included) are relative to the working directory.

Both become absolute when the config is loaded, so the resolved config saved in a run directory works from any
directory, and a resumed run compares the same strings from wherever it is started.

Not every value of a path-valued key is a path. A model value (``model.name_or_path``, a reward model, an eval
model) may be ``default`` or a hub id (``org/name``): it stays as written unless a file or folder of that name
exists relative to the base, or it looks like a path (:func:`looks_like_path`), which is then made absolute so
that a missing one is reported with the place it was looked for. A template may be a built-in name, and a
function spec may name a module (``package.module:function``) rather than a file (``file.py:function``). A data
value (``data.train``, ``eval.generation_data``, an eval's ``data`` / ``pairs``) may be a Hub dataset id
(:func:`looks_like_hub_dataset`), a source mapping or a mixture (``tuneforge.data.sources``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct, imported from its GGUF file once
# Names data.template accepts besides the path of a Jinja file (tuneforge.data.templates implements them).
TEMPLATE_NAMES = ("auto", "tokenizer", "alpaca", "chatml", "simple")
TEMPLATE_SUFFIXES = (".jinja", ".j2", ".jinja2")
# A model value ending like this is a file, never a hub id (a run config is read by `tuneforge estimate`).
MODEL_FILE_SUFFIXES = (".gguf", ".yaml", ".yml", ".json")
PATH_RULE = "relative paths in a config file are relative to that file; on the command line, to the working directory"

# The path-valued keys of a run config (dotted) and of an eval config, each with its kind (see RESOLVERS).
RUN_CONFIG_PATHS = {
    "model.name_or_path": "model",
    "data.train": "data",
    "data.validation": "data",
    "data.template": "template",
    "train.output_dir": "path",
    "eval.generation_data": "data",
    "eval.generation_metrics": "function",
    "grpo.reward_functions": "function",
    "grpo.reward_model": "model",
    "ppo.reward_functions": "function",
    "ppo.reward_model": "model",
    "online_dpo.reward_functions": "function",
    "online_dpo.reward_model": "model",
    "gkd.teacher": "model",
}
EVAL_CONFIG_PATHS = {
    "model": "model",
    "compare": "model",
    "judge": "model",
    "data": "data",
    "pairs": "data",
    "harmful": "path",
    "benign": "path",
    "template": "template",
    "metrics": "function",
    "out": "path",
}


def looks_like_path(value: str, base: str | Path | None = None) -> bool:
    """Whether a model value is meant as a local path rather than a hub id: it starts with ``./``, ``../``, ``/``
    or ``~``, ends in ``.gguf``, ``.yaml``, ``.yml`` or ``.json``, has more than one ``/``, or its parent folder
    exists under ``base`` (default: the working directory), as ``runs/velmora-sft`` does when ``runs/`` exists."""
    if value in (".", "..") or value.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in value:
        return True
    if Path(value).suffix.lower() in MODEL_FILE_SUFFIXES or value.count("/") > 1:
        return True
    parent = Path(value).parent
    return parent != Path(".") and (Path(base or ".") / parent).is_dir()


def is_template_path(spec: str, base: str | Path | None = None) -> bool:
    """Whether a template value names a file (a Jinja suffix, a folder in it, or a file of that name under
    ``base``) rather than a built-in template."""
    if spec in TEMPLATE_NAMES:
        return False
    return (Path(spec).suffix in TEMPLATE_SUFFIXES or "/" in spec or "\\" in spec
            or (Path(base or ".") / spec).is_file())


def absolute(value: str, base: str | Path) -> str:
    """``value`` (``~`` expanded) joined to ``base`` when relative, normalised (``..`` folded, links kept)."""
    return os.path.abspath(Path(base) / os.path.expanduser(value))


def _path(value: str, base: Path) -> str:
    return absolute(value, base) if value else value


def _model(value: str, base: Path) -> str:
    if value in (DEFAULT_MODEL, ""):
        return value
    if (Path(base) / os.path.expanduser(value)).exists() or looks_like_path(value, base):
        return absolute(value, base)
    return value  # a hub id


def _template(value: str, base: Path) -> str:
    return absolute(value, base) if is_template_path(value, base) else value


def _function(value: str, base: Path) -> str:
    # Commas separate names in an eval config's `metrics: a,b` string; a list item holds one spec.
    parts = []
    for spec in value.split(","):
        source, colon, name = spec.strip().rpartition(":")
        # The same test as tuneforge.rewards.functions.load_callable: a file, not a module.
        is_file = colon and (source.endswith(".py") or "/" in source or "\\" in source)
        parts.append(f"{absolute(source, base)}:{name}" if is_file else spec)
    return ",".join(parts)


# Suffixes of the data files tuneforge reads: a data value ending so is a file, never a Hub dataset id.
DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".arrow")


def looks_like_hub_dataset(value: str, base: str | Path | None = None) -> bool:
    """Whether a data value names a Hub dataset (``org/name``) rather than a local file or folder: exactly one
    ``/``, no data-file suffix, and nothing of that name (nor its ``org`` folder) under ``base``."""
    if not isinstance(value, str) or value.count("/") != 1 or value.startswith(("./", "/", "~")) or "\\" in value:
        return False
    if Path(value).suffix.lower() in DATA_FILE_SUFFIXES:
        return False
    return not (Path(base or ".") / value).exists() and not looks_like_path(value, base)


def _data(value, base: Path):
    """A data value (``data.train``...): a path is made absolute, a Hub id stays; in a source mapping (and in each
    entry of a mixture) its ``path`` follows the same rule and its ``template`` the template rule."""
    if isinstance(value, str):
        return value if not value or looks_like_hub_dataset(value, base) else absolute(value, base)
    if isinstance(value, list):
        return [_data(item, base) for item in value]
    if isinstance(value, dict) and "path" in value:
        out = dict(value)
        if isinstance(out["path"], str):
            out["path"] = _data(out["path"], base)
        if isinstance(out.get("template"), str):
            out["template"] = _template(out["template"], base)
        return out
    return value  # rows in memory, or a value config validation refuses


RESOLVERS: dict[str, Callable[[str, Path], str]] = {"path": _path, "model": _model, "template": _template,
                                                    "function": _function, "data": _data}


def resolve_paths(values: dict, base: str | Path, keys: Mapping[str, str], only: set[str] | None = None) -> dict:
    """A copy of the nested config ``values`` with the path-valued ``keys`` (dotted key -> kind) made absolute
    against ``base``, by the rule of this module; ``only`` limits it to those keys. A value that is neither a
    string nor a list of strings (rows in memory, a number a later check refuses) is left alone."""
    out = _copy(values)
    for key, kind in keys.items():
        if only is not None and key not in only:
            continue
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        fix, value = RESOLVERS[kind], node[name]
        if kind == "data":  # a path, a Hub id, a source mapping or a list of them
            node[name] = fix(value, Path(base))
        elif isinstance(value, str):
            node[name] = fix(value, Path(base))
        elif isinstance(value, list):
            node[name] = [fix(item, Path(base)) if isinstance(item, str) else item for item in value]
    return out


def overridden_keys(keys: Mapping[str, str], dotted: list[str]) -> set[str]:
    """The keys of ``keys`` that the dotted override keys ``dotted`` set (a whole section counts for its keys)."""
    return {key for key in keys if any(key == d or key.startswith(d + ".") for d in dotted)}


def _copy(values):
    # Sections are copied; lists are replaced, never changed in place, so they are shared.
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in values.items()}

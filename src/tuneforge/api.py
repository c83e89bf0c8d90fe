"""The Python API: what a notebook imports. ``tuneforge train`` and ``tuneforge eval`` are thin layers over the
same functions, so both front ends validate the same way and raise the same messages (here in Python's words:
``overwrite=True``, not ``--overwrite``)::

    import tuneforge as tf
    run = tf.train("sft", model="default", data=rows, lora={"r": 16}, train={"max_steps": 60})
    run.summary, run.metrics                     # summary.json, metrics.jsonl
    model, tokenizer = run.load()                # a transformers (PEFT for LoRA runs) model
    run.generate([{"role": "user", "content": "Hi"}])
    tf.evaluate(run, data=heldout_rows)          # the eval.json object of `tuneforge eval`
    tf.train("dpo", model=run, data=pairs)       # a run is a model wherever a model is accepted
    run.push("me/my-model")                      # the adapter, tokenizer and model card, to the Hub

Data (``data=``, ``validation=``, ``tf.evaluate``'s inputs) is a file path, a list of dicts, or a ``datasets``
``Dataset`` / ``DatasetDict``; rows in memory meet the validation of file rows (``tuneforge.data.memory``).
Errors are :class:`~tuneforge.errors.UserError` subclasses: ``ConfigError`` (options), ``DataError`` (a row:
``.path``, ``.row``, ``.field``), ``ModelSourceError``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from tuneforge.config import RunConfig, config_from_dict, read_yaml_mapping
from tuneforge.config_aliases import translate_aliases
from tuneforge.data.memory import InMemoryRows
from tuneforge.data.sources import DataSource, is_mixture, is_source_mapping
from tuneforge.errors import ConfigError, DataError, UserError, python_api
from tuneforge.paths import RUN_CONFIG_PATHS, overridden_keys, resolve_paths

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------------ a run
class Run:
    """A run directory (``train.output_dir``): what training left in it, and the model it holds.

    ``Run(path)`` opens an existing one; :func:`train` returns one. A run is accepted wherever a model is (it is
    path-like: ``os.fspath(run)`` is its directory).

    Attributes:
        path: the run directory.
    """

    def __init__(self, path: str | os.PathLike, summary: dict | None = None):
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise UserError(f"{self.path} is not a tuneforge run directory (no config.yaml); give the "
                            "train.output_dir of a run")
        self._summary = summary  # what training returned, for a run stopped before it wrote summary.json
        self._generator = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> dict:
        """The resolved config the run trained with (``config.yaml``), as nested dicts."""
        return yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))

    @property
    def summary(self) -> dict:
        """``summary.json``: steps, tokens, final losses and validation metrics, stop reason, best step...; a run
        stopped by a signal has none on disk yet, and gives what training returned (or ``{}``)."""
        path = self.path / "summary.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return dict(self._summary or {})

    @property
    def metrics(self) -> list[dict]:
        """``metrics.jsonl``: one dict per logging step (``loss``, ``lr``, ``tokens_per_s``...) and per evaluation
        (``val_*``)."""
        from tuneforge.engine.metrics import read_metrics

        path = self.path / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def load(self, dtype: str = "float32") -> tuple:
        """(model, tokenizer) of this run: :func:`load`."""
        return load(self, dtype=dtype)

    def generate(self, messages, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0
                 ) -> str | list[str]:
        """:func:`generate` with this run's model, loaded once and kept for later calls."""
        from tuneforge.generation import Generator

        if self._generator is None:
            self._generator = Generator.load(str(self.path))
        return generate(self._generator, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p)

    def evaluate(self, **options) -> dict:
        """:func:`evaluate` this run (``data=``, ``pairs=``, ``metrics=``, ``compare=``...)."""
        return evaluate(self, **options)

    def push(self, repo_id: str, merged: bool = False, private: bool = False, revision: str | None = None,
             token: str | None = None, log: Log | None = print) -> str:
        """:func:`push` this run to the Hub repo ``repo_id``; returns the commit's URL."""
        return push(self, repo_id, merged=merged, private=private, revision=revision, token=token, log=log)


def _model_spec(model) -> str:
    """A model argument as the config and the loaders take it: ``default``, a folder, a file, a hub id."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise ConfigError(f"model: expected 'default', a folder, a .gguf file, a run (tuneforge.Run or its directory) "
                      f"or a hub id, got {type(model).__name__}")


# ------------------------------------------------------------------------------------------------------- data
def _datasets_module():
    # Whoever holds a Dataset has imported `datasets`; others never pay for importing it.
    return sys.modules.get("datasets")


def _is_dataset_dict(value) -> bool:
    module = _datasets_module()
    return module is not None and isinstance(value, module.DatasetDict)


def rows_value(value, key: str, kind: str | None = None):
    """A data argument as a config value: a path (kept as a string) or :class:`InMemoryRows` named after ``key``
    (``data.train (in-memory rows)``, ``data.train (Dataset)``) from a list (any iterable) of dicts, a
    ``datasets.Dataset`` or a pandas ``DataFrame``. ``kind`` overrides the name in brackets."""
    if value is None or isinstance(value, (str, InMemoryRows, DataSource)):
        return value
    if is_source_mapping(value):  # {"path": rows or a path, "weight": 2, ...}: one source with options
        return {**value, "path": rows_value(value["path"], f"{key}.path", kind)}
    if is_mixture(value):  # a list of such mappings (a plain list of dicts is rows)
        return [rows_value(item, f"{key}[{index}]", kind) for index, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    module = _datasets_module()
    if module is not None and isinstance(value, module.Dataset):
        return InMemoryRows([dict(record) for record in value], f"{key} ({kind or 'Dataset'})")
    if _is_dataset_dict(value):
        raise ConfigError(f"{key}: a DatasetDict holds several splits ({', '.join(value)}); pass one, e.g. "
                          f"dataset['{next(iter(value), 'train')}']")
    if module is not None and isinstance(value, getattr(module, "IterableDataset", ())):
        raise ConfigError(f"{key}: a streaming IterableDataset cannot be validated before training; load it "
                          "without streaming=True, or take rows with list(dataset.take(N))")
    if type(value).__name__ == "DataFrame" and hasattr(value, "to_dict"):  # pandas: one dict per row
        return InMemoryRows(value.to_dict("records"), f"{key} ({kind or 'DataFrame'})")
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        return InMemoryRows(list(value), f"{key} ({kind or 'in-memory rows'})")
    raise ConfigError(f"{key}: expected a file path, a list of dicts or a datasets.Dataset, got "
                      f"{type(value).__name__}")


def _data_values(data: dict) -> dict:
    """The data section with its rows made config values; a DatasetDict gives its 'train' split, and its
    'validation' (else 'test') split when the section sets no validation."""
    data = dict(data)
    splits = data.get("train")
    if _is_dataset_dict(splits):
        if "train" not in splits:
            raise ConfigError(f"data: the DatasetDict has no 'train' split (it has {', '.join(splits)}); pass the "
                              "split to train on, e.g. data=dataset['NAME']")
        data["train"] = rows_value(splits["train"], "data.train", "DatasetDict['train']")
        held_out = next((name for name in ("validation", "test") if name in splits), None)
        if held_out and data.get("validation") is None and not data.get("val_fraction"):
            data["validation"] = rows_value(splits[held_out], "data.validation", f"DatasetDict['{held_out}']")
    for key in ("train", "validation"):
        if key in data:
            data[key] = rows_value(data[key], f"data.{key}")
    return data


# --------------------------------------------------------------------------------------------------- training
def run_training(config: RunConfig, overwrite: bool = False, resume: bool | str = False, force: bool = False,
                 log: Log = print, show_progress: bool | None = None) -> dict:
    """Train a validated config: the one training path of ``tuneforge train`` and :func:`train`. Returns the run's
    summary (what ``summary.json`` holds, with ``run_dir``)."""
    from tuneforge.engine.distributed import shutdown_distributed
    from tuneforge.engine import trainer

    try:
        summary = trainer.run_training(config, overwrite=overwrite, log=log, resume=resume, force=force,
                                       show_progress=show_progress)
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    return summary


def _merge(base: dict, given: dict) -> dict:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _dotted(values: dict, prefix: str = "") -> list[str]:
    return [name for key, value in values.items()
            for name in (_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) and value else
                         [f"{prefix}{key}"])]


def _start_values(config) -> dict:
    """The values :func:`train` starts from: none, a dict of sections, or a YAML file (its paths relative to it)."""
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, dict):
        # Sections copied: the caller's dicts are never changed. Hugging Face names become tuneforge keys first, so
        # the sections given to train() override them as they do any key of the config.
        return translate_aliases(config)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        values = translate_aliases(read_yaml_mapping(path, "config file", "the config must be a mapping of sections"))
        return resolve_paths(values, path.parent, RUN_CONFIG_PATHS)
    raise ConfigError(f"config: expected a dict of sections or the path of a YAML config, got {type(config).__name__}")


def _default_output_dir(method: str) -> str:
    """``runs/<method>-<date>-<time>``: a fresh directory for each run, so a notebook never collides with its
    previous run (or trains on top of the run it starts from)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{method}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{method}-{stamp}-{n}"
    return str(path)


def build_config(method: str | None = None, model=None, data=None, validation=None, output_dir=None,
                 config=None, resume: bool | str = False, **sections) -> RunConfig:
    """The validated :class:`RunConfig` of a :func:`train` call (see there for the arguments)."""
    values = _start_values(config)
    given: dict = {}
    for name, section in sections.items():
        if name == "lora" and isinstance(section, bool):
            section = {"enabled": section}  # lora=False: full fine-tuning
        if not isinstance(section, dict):
            raise ConfigError(f"{name}=: expected a dict of {name}.* options (e.g. lora={{'r': 16}}), got "
                              f"{section!r}")
        given[name] = dict(section)
    if method is not None:
        given["method"] = method
    if model is not None:
        given["model"] = {**given.get("model", {}), "name_or_path": _model_spec(model)}
    if isinstance(data, dict) and not is_source_mapping(data):  # the data section, not one {"path": ...} source
        given["data"] = {**given.get("data", {}), **data}
    elif data is not None:
        given["data"] = {**given.get("data", {}), "train": data}
    if validation is not None:
        given["data"] = {**given.get("data", {}), "validation": validation}
    if output_dir is not None:
        given.setdefault("train", {})["output_dir"] = os.fspath(output_dir)
    values = _merge(values, given)
    if not isinstance(values.get("data"), dict) or values["data"].get("train") in (None, ""):
        raise ConfigError("data: no training data given; pass data= a list of dicts, a datasets.Dataset or the "
                          "path of a data file")
    values["data"] = _data_values(values["data"])
    if isinstance(values.get("eval"), dict) and "generation_data" in values["eval"]:
        values["eval"]["generation_data"] = rows_value(values["eval"]["generation_data"], "eval.generation_data")
    if not (values.get("train") or {}).get("output_dir"):
        if resume is True:
            raise ConfigError("resume=True continues a run directory: give output_dir (that run's directory)")
        values.setdefault("train", {})["output_dir"] = _default_output_dir(values.get("method") or "sft")
        given.setdefault("train", {})["output_dir"] = values["train"]["output_dir"]
    # Paths given here are relative to the working directory, as on the command line; they are saved absolute.
    values = resolve_paths(values, Path.cwd(), RUN_CONFIG_PATHS,
                           only=overridden_keys(RUN_CONFIG_PATHS, _dotted(given)))
    return config_from_dict(values)


def train(method: str | None = None, *, model=None, data=None, validation=None, output_dir=None,
          overwrite: bool = False, resume: bool | str = False, force: bool = False, config=None,
          show_progress: bool = True, log: Log | None = print, **sections) -> Run:
    """Train a model and return its :class:`Run`, as ``tuneforge train`` does.

    Args:
        method: ``sft``, ``reward``, ``dpo``, ``simpo``, ``orpo``, ``kto``, ``grpo``, ``rloo`` or ``ppo``; None
            keeps the method of ``config`` (default ``sft``).
        model: ``"default"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face folder, a ``.gguf`` file, a
            :class:`Run` (or its directory) or a hub id; None keeps ``config``'s (default ``"default"``).
        data: training rows: a list of dicts, a ``datasets.Dataset``, a ``DatasetDict`` (its ``train`` split;
            its ``validation``, else ``test``, split validates unless ``validation`` is given), the path of a
            file or folder, a Hub dataset id (``"org/name"``), one source (``{"path": "org/name", "split":
            "train", "columns": {...}}``) or a mixture (a list of such dicts with ``weight`` or ``fraction``; see
            docs/data.md). Any other dict is the ``data`` section (``data={"train": rows, "max_length": 256}``).
        validation: validation rows, in any form ``data`` takes (default: none, or ``data.val_fraction``).
        output_dir: the run directory (``train.output_dir``); default ``runs/<method>-<date>-<time>``.
        overwrite: replace an existing run directory (else it is refused).
        resume: continue the run in ``output_dir`` from its newest complete checkpoint (True), or from a
            checkpoint folder (a path). Rows in memory resume when the same rows are given again.
        force: resume even though the config changes what is trained.
        config: where the options start from: a dict of sections, a :class:`RunConfig`, or the path of a YAML
            config (its relative paths are relative to it); the arguments above and ``sections`` go on top.
        show_progress: a progress bar (a widget in a notebook; tqdm on a terminal); default True.
        log: where progress lines go (data report, memory estimate, evaluations); None for silence.
        **sections: config sections as dicts merged into the config, e.g. ``lora={"r": 16}``,
            ``train={"max_steps": 60, "lr": 1e-4}``, ``dpo={"beta": 0.1}``; ``lora=False`` fine-tunes fully.
            Every option: ``tuneforge train --help``.

    Raises:
        ConfigError: an unknown option, a wrong type or a value out of range, before anything loads.
        DataError: a bad row (its source, row and field), before the model loads.
        UserError: an existing run directory (``overwrite=True`` replaces it), a model not found...
    """
    with python_api():
        built = build_config(method, model=model, data=data, validation=validation, output_dir=output_dir,
                             config=config, resume=resume, **sections)
        summary = run_training(built, overwrite=overwrite, resume=resume, force=force, log=log or _quiet,
                               show_progress=show_progress)
    return Run(summary["run_dir"], summary=summary)


# ------------------------------------------------------------------------------------------ using a model
def load(model, dtype: str = "float32", template: str | None = None) -> tuple:
    """(model, tokenizer) of any model source (``"default"``, a folder, a ``.gguf`` file, a run, a hub id): a
    transformers model on the best device, in eval mode; for a LoRA run a ``peft.PeftModel`` with its adapter
    (and a QLoRA run's base quantized as in training)."""
    from tuneforge.generation import Generator

    generator = Generator.load(_model_spec(model), template=template, dtype=dtype)
    return generator.model, generator.tokenizer


def conversations_from(messages) -> tuple[list, bool]:
    """(conversations as lists of ``Message``, whether one conversation was given) from a user message (a
    string), one conversation (a list of ``{"role", "content"}`` dicts) or a list of conversations. Each must end
    with a user message; a bad one raises :class:`DataError` naming it and the field."""
    from tuneforge.data.formats import ROLES, Message, _Checker

    single = isinstance(messages, str) or (isinstance(messages, list) and bool(messages)
                                            and all(isinstance(m, (dict, Message)) for m in messages))
    batch = [messages] if single else messages
    if not isinstance(batch, list) or not batch:
        raise DataError("messages", None, None, "expected a user message (a string), a conversation (a list of "
                        "{'role', 'content'} dicts) or a list of conversations", "wrong_type")
    conversations = []
    for index, item in enumerate(batch):
        check = _Checker("messages" if single else "conversations", None if single else index)
        if isinstance(item, str):
            item = [{"role": "user", "content": item}]
        if isinstance(item, list) and item and all(isinstance(m, Message) for m in item):
            conversation = list(item)
        else:
            conversation = check.message_list({"messages": item}, "messages", "role", "content",
                                              {role: role for role in ROLES})
        if not conversation or conversation[-1].role != "user":
            raise check.fail("messages", "must end with a user message (the turn to answer)", "no_prompt")
        conversations.append(conversation)
    return conversations, single


def generate(model, messages, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             template: str | None = None, dtype: str = "float32") -> str | list[str]:
    """Answer with the template the model was trained with (a run's own, else the tokenizer's).

    Args:
        model: any model source (see :func:`load`), or a ``tuneforge.generation.Generator`` already loaded.
        messages: a user message (a string), one conversation (a list of ``{"role", "content"}`` dicts ending
            with a user message), or a list of conversations.
        max_new_tokens: longest answer in tokens; default 128.
        temperature: 0 (default) is greedy; above 0 samples, with ``top_p``.

    Returns:
        The answer (a string) for one conversation, a list of answers for a list.
    """
    from tuneforge.generation import Generator

    conversations, single = conversations_from(messages)
    generator = model if isinstance(model, Generator) else Generator.load(_model_spec(model), template=template,
                                                                          dtype=dtype)
    answers = generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p)
    return answers[0] if single else answers


# -------------------------------------------------------------------------------------------------- evaluation
EVAL_DATA_KEYS = ("data", "pairs", "harmful", "benign")


def _eval_rows(value, key: str):
    if _is_dataset_dict(value):
        split = next((name for name in ("test", "validation") if name in value), None)
        if split is None:
            raise ConfigError(f"{key}: the DatasetDict has no 'test' or 'validation' split (it has "
                              f"{', '.join(value)}); pass the split to evaluate on, e.g. {key}=dataset['NAME']")
        return rows_value(value[split], key, f"DatasetDict['{split}']")
    return rows_value(value, key)


def evaluate(model, data=None, pairs=None, harmful=None, benign=None, metrics: list[str] | None = None,
             compare: list | None = None, labels: list[str] | None = None, out=None, config=None,
             log: Log | None = print, **settings) -> dict:
    """Measure a model or run (and ``compare`` ones beside it), as ``tuneforge eval`` does: the same eval.json
    object, written to ``out`` (default ``RUN_DIR/eval.json`` for a run, else ``./eval.json``; an existing file
    becomes ``eval.N.json``) and returned.

    Args:
        model: any model source (see :func:`load`).
        data: held-out rows (SFT rows, whose last assistant message is the reference, or prompt-only rows): a
            list of dicts, a ``datasets.Dataset`` (a ``DatasetDict`` gives its ``test``, else ``validation``,
            split) or a file path. ``pairs``: preference pairs (preference accuracy); ``harmful`` / ``benign``:
            prompts for the refusal rates; each in the same forms.
        metrics: metric names and user metrics (``module:function``); default: all the inputs allow.
        compare: more models or runs, one column each; ``labels`` names the columns.
        config: an eval config (YAML path) to start from, as ``tuneforge eval --config``.
        **settings: the other keys of ``tuneforge.eval.evaluate.EvalSettings`` (``max_new_tokens``,
            ``temperature``, ``batch_size``, ``limit``, ``judge``, ``beta``, ``samples``, ``lm_eval`` ...).

    Returns:
        The eval.json object: ``metrics`` (per model label: ``loss``, ``perplexity``, ``exact_match``...),
        ``models``, ``settings``, ``samples``, ``win_rate``, ``notes``.
    """
    from tuneforge.eval.evaluate import load_settings, run_eval

    values = {**settings, "model": _model_spec(model), "metrics": metrics, "labels": labels,
              "compare": [_model_spec(m) for m in compare] if compare else None,
              "out": os.fspath(out) if out is not None else None}
    for key, value in zip(EVAL_DATA_KEYS, (data, pairs, harmful, benign)):
        values[key] = _eval_rows(value, key)
    with python_api():
        chosen = load_settings(config, {k: v for k, v in values.items() if v is not None})
        if not (any(getattr(chosen, key) for key in EVAL_DATA_KEYS) or chosen.lm_eval):
            raise ConfigError("nothing to evaluate: give data=, pairs=, harmful=, benign= or lm_eval=")
        report, _ = run_eval(chosen, log=log or _quiet)
    return report


# --------------------------------------------------------------------------------------------------------- hub
def push(model, repo_id: str, merged: bool = False, private: bool = False, revision: str | None = None,
         token: str | None = None, log: Log | None = print) -> str:
    """Upload a run (or a model folder) to the Hugging Face Hub, as ``tuneforge push`` does; returns the URL of the
    commit.

    Args:
        model: a :class:`Run` or its directory (a LoRA run uploads its adapter, tokenizer and model card; a full
            run its model), or a model folder (uploaded as it is, plus a card when it has no README.md).
        repo_id: ``OWNER/NAME`` of the model repo, created when missing.
        merged: upload the LoRA run merged into its base (a plain transformers model) instead of the adapter.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to, created when missing (default: ``main``).
        token: a Hugging Face token (default: ``HF_TOKEN``, else the one ``hf auth login`` saved).

    Raises:
        UserError: no token, the hub unreachable (both before any model work, in seconds), the hub refusing the
            upload, or a source that is neither a run nor a model folder.
    """
    from tuneforge.models.push import push as push_to_hub

    with python_api():
        return push_to_hub(_model_spec(model), repo_id, merged=merged, private=private, revision=revision,
                           token=token, log=log or _quiet)


__all__ = ["Run", "train", "load", "generate", "evaluate", "push", "build_config", "run_training"]

"""A bridge to lm-evaluation-harness (``pip install 'tuneforge[lmeval]'``): its tasks on any model tuneforge loads.

The model is loaded by tuneforge (``default``, a Hugging Face folder, a ``.gguf`` file, a run directory with its
LoRA adapter on its base) and handed to lm-eval's ``HFLM`` in memory, so lm-eval never looks a model up on the
hub. Tasks come from lm-eval's own catalogue, from the tasks shipped with tuneforge (``TASKS_DIR``: the
``tuneforge`` tag, ``tuneforge_velmora`` and ``tuneforge_arithmetic``) and from ``include_path``. The whole call
runs with the Hugging Face hub and ``datasets`` in offline mode: a catalogue task whose data set is not already
in the local Hugging Face cache stops with a message saying so, rather than downloading it.

Results are ``{task: {metric: value}}``. lm-eval names its numbers ``"<metric>,<filter>"``; the filter is
dropped when it is ``none`` (loglikelihood tasks) and kept as ``"<metric>/<filter>"`` otherwise. Standard
errors are kept as ``"<metric>_stderr"`` (``"<metric>_stderr/<filter>"``) where lm-eval computed one; its
``"N/A"`` placeholders and non-numeric entries (``alias``) are dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from tuneforge.errors import DataError, UserError
from tuneforge.models.loading import ModelSource, load_model, load_tokenizer, resolve_model
from tuneforge.quiet import quiet_lm_eval_git

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
INSTALL_HINT = "lm-eval is not installed: pip install 'tuneforge[lmeval]'"
NO_FILTER = "none"
# Both libraries read these variables once, at import, into module constants; the context manager below sets
# the variables and the constants.
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE"))
# Warnings lm-eval prints on every call that describe this bridge's choices, not a problem: tuneforge loaded the
# model itself (so HFLM's loading arguments are unused), and local tasks read their data with a custom loader.
_EXPECTED_WARNINGS = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


def run_lm_eval(source: str, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                include_path: str | None = None, num_fewshot: int | None = None, device: str = "cpu"
                ) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on the model ``source`` and return ``{task: {metric: value}}``.

    Args:
        source: anything a tuneforge model argument accepts: ``default``, a Hugging Face folder, a ``.gguf``
            file, a run directory (a LoRA run is evaluated as its adapter on its base, unmerged, exactly as it
            was trained), or a hub id already in the local cache.
        tasks: lm-eval task, group or tag names (glob patterns such as ``tuneforge_*`` work), or paths to task
            YAML files.
        limit: evaluate at most this many documents per task (lm-eval's ``limit``: a fraction when below 1);
            None for all.
        batch_size: requests per forward pass.
        include_path: a folder of extra task YAMLs, searched after the shipped ones.
        num_fewshot: examples put before each question; None keeps each task's own setting (0 for ours).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...

    Returns:
        For each evaluated task (and group, for groups), metric name to value: ``acc`` and ``acc_norm`` for
        multiple-choice tasks, with ``acc_stderr`` and ``acc_norm_stderr`` (see the module docstring).

    Raises:
        UserError: lm-eval is not installed, a task name is unknown, a task's data is missing or not local, or
            the source is a reward model (it has no language-model head to score text with).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if not tasks:
        raise UserError("no lm-eval task given; try --lm-eval tuneforge (the tasks shipped with tuneforge)")
    with offline_hub():
        model_source = resolve_model(source)
        if model_source.is_reward_model:
            raise UserError(f"{source} is a reward model (a scalar head, no language-model head); lm-eval tasks "
                            "score text with a causal language model")
        manager, names = _task_manager(TaskManager, tasks, include_path)
        model = _load_model(model_source, torch.device(device))
        lm = HFLM(pretrained=model, tokenizer=load_tokenizer(model_source), batch_size=batch_size)
        try:
            with _global_rng_kept():  # simple_evaluate seeds python, numpy and torch: its runs repeat exactly
                results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                                  task_manager=manager, log_samples=False)
        except ConnectionError as error:  # datasets' OfflineModeIsEnabled among them
            raise UserError(f"lm-eval task data is not available offline ({error}). tuneforge runs lm-eval "
                            "without network access: fetch the data set into the Hugging Face cache where the "
                            "hub is reachable, or write a local task (docs/lm_eval.md)") from None
    return flatten_results(results["results"])


def flatten_results(results: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results["results"]`` as ``{task: {metric: value}}`` (names as in the module docstring).

    >>> flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "f1_stderr,none": "N/A"}})
    {'t': {'acc': 0.5, 'acc_stderr': 0.1}}
    """
    flat: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "samples", and the "N/A" lm-eval writes for a missing stderr
            metric, _, filter_name = key.partition(",")
            metrics[metric if filter_name == NO_FILTER else f"{metric}/{filter_name}"] = float(value)
        flat[task] = metrics
    return flat


def local_dataset(folder: str | Path, data_files: str | Mapping[str, str], **_metadata):
    """The ``custom_dataset`` loader of a local task: ``{split: datasets.Dataset}`` from files under ``folder``.

    A task YAML names it through a ``utils.py`` beside it (see ``lm_eval_tasks/utils.py``), with its files in
    ``dataset_kwargs: {data_files: {test: rows.jsonl}}``; relative paths are relative to ``folder``, not to the
    working directory. Files are read with tuneforge's readers (JSONL, JSON, CSV, Parquet), so nothing touches
    the ``datasets`` cache or the network. lm-eval also passes the task's ``metadata``; it is ignored.

    Raises:
        DataError: a row that cannot be read, naming the file and the row.
        UserError: a missing file, or a file without rows.
    """
    import datasets

    from tuneforge.data.readers import BadRow, read_rows

    files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    splits = {}
    for split, name in files.items():
        path = Path(folder) / name
        rows = read_rows(path)
        bad = [row.error for row in rows if isinstance(row, BadRow)]
        if bad:
            raise bad[0]
        if not rows:
            raise UserError(f"{path}: no rows for split '{split}' of an lm-eval task")
        try:
            splits[split] = datasets.Dataset.from_list([row.fields for row in rows])
        except (TypeError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
            # Arrow needs one type per field across rows.
            raise DataError(str(path), None, None, f"rows do not share one schema ({error})",
                            "mixed_types") from None
    return datasets.DatasetDict(splits)


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hugging Face hub and ``datasets`` in offline mode for the duration, then as they were."""
    import importlib

    saved_variables = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    saved_constants = []
    for module_name, attribute in _OFFLINE_CONSTANTS:
        module = importlib.import_module(module_name)
        saved_constants.append((module, attribute, getattr(module, attribute)))
    try:
        os.environ.update({name: "1" for name in _OFFLINE_VARIABLES})
        for module, attribute, _ in saved_constants:
            setattr(module, attribute, True)
        yield
    finally:
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, attribute, value in saved_constants:
            setattr(module, attribute, value)


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """The caller's python, numpy and torch RNG states, as they were before the block."""
    import random

    import numpy as np

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    quiet_lm_eval_git()
    for logger_name, fragments in _EXPECTED_WARNINGS.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected(fragments))
    return lm_eval, HFLM, TaskManager


class _DropExpected(logging.Filter):
    """Drops lm-eval warnings that say what this bridge does on purpose (see ``_EXPECTED_WARNINGS``)."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """A ``TaskManager`` that knows ``tasks``, and their names expanded from glob patterns (paths to YAML files
    kept as they are). Local folders first: indexing lm-eval's own catalogue takes seconds (~15,000 YAMLs), so it
    is only read when a task is not local, and once per process. Unknown names raise ``UserError``."""
    folders = (str(TASKS_DIR),) + ((str(include_path),) if include_path else ())
    local = TaskManager(include_path=list(folders), include_defaults=False)
    try:
        return local, _match_tasks(local, tasks)
    except UserError:
        everything = _catalogue(TaskManager, folders)
        return everything, _match_tasks(everything, tasks)


@functools.lru_cache(maxsize=4)
def _catalogue(TaskManager, folders: tuple[str, ...]):
    return TaskManager(include_path=list(folders))


def _match_tasks(manager, tasks: list[str]) -> list[str]:
    names: list[str] = []
    for task in tasks:
        if Path(task).suffix in (".yaml", ".yml") and Path(task).is_file():
            names.append(task)
            continue
        matched = manager.match_tasks([task])
        if not matched:
            shipped = sorted(name for name in manager.all_tasks if name.startswith("tuneforge"))
            raise UserError(f"unknown lm-eval task {task!r}; tasks shipped with tuneforge: {', '.join(shipped)} "
                            "(the full catalogue: lm-eval ls tasks)")
        names += [name for name in matched if name not in names]
    return names


def _load_model(source: ModelSource, device: torch.device) -> torch.nn.Module:
    """The causal LM of ``source`` on ``device``, in eval mode; a LoRA run's adapter stays unmerged on its base."""
    model = load_model(source, "float32", device=device)
    if source.quantization is None:  # a quantized base was placed on the device while loading
        model = model.to(device)
    return model.eval()

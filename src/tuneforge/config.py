"""Typed, validated run configuration.

A run is described by one YAML file plus ``key=value`` overrides with dotted keys (``lora.r=8``).
Unknown keys, wrong types and out-of-range values fail here, before any data or model is loaded.

Every option, its type and its default is listed in the dataclasses below; ``tuneforge train --help``
prints the same list.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml

from tuneforge.config_aliases import describe_aliases, translate_aliases, translate_overrides
from tuneforge.data.memory import InMemoryRows, recorded
from tuneforge.data.sources import check_data_value
from tuneforge.errors import ConfigError
# Where paths in a config are resolved (relative to the config file, or to the working directory for overrides).
from tuneforge.paths import (DEFAULT_MODEL, RUN_CONFIG_PATHS, TEMPLATE_NAMES, TEMPLATE_SUFFIXES,  # noqa: F401
                             is_template_path, overridden_keys, resolve_paths)


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
    """

    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False


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

    def check(self, method: str, validates: bool, strategy: str) -> None:
        """The generation options against each other and the run; ``validates``: the run has validation rows."""
        if self.generation_data and not self.generation_metrics:
            raise ConfigError("eval.generation_metrics: empty, so eval.generation_data would be answered for nothing; "
                              "name at least one metric, or unset eval.generation_data")
        for spec in self.generation_metrics:
            known = isinstance(spec, str) and (spec in GENERATION_METRICS
                                               or (":" in spec
                                                   and all(part.isidentifier()
                                                           for part in spec.rpartition(":")[2].split("."))))
            if not known:
                close = difflib.get_close_matches(str(spec), GENERATION_METRICS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"eval.generation_metrics: unknown metric {spec!r}{hint}; use any of "
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
        if method == "reward":
            raise ConfigError("eval.generation_data: method reward trains a scoring model, which does not generate; "
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


@dataclass
class DPOConfig:
    """``method: dpo``: Direct Preference Optimization and the variants that only change its per-pair loss.

    Attributes:
        beta: KL strength: how far the policy may move from the reference (tau for IPO).
        loss: ``sigmoid`` (DPO), ``ipo`` (on per-token mean log-probs, as TRL), ``cdpo`` (conservative DPO,
            label smoothing), ``robust`` (rDPO) or ``hinge`` (SLiC / RSO); equations in ``tuneforge.losses.dpo_loss``.
        label_smoothing: assumed rate of flipped preference labels, in [0, 0.5); ``cdpo`` and ``robust`` only.
        precompute_ref: compute the reference log-probs once in a pass over the data before training and cache them
            in the run directory; training then needs no reference forward pass (and, for full fine-tuning, no
            second copy of the model).
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False


@dataclass
class SimPOConfig:
    """``method: simpo``: reference-free, length-normalised preference optimisation (Meng et al. 2024).

    Attributes:
        beta: reward scale on the per-token mean log-prob (the paper uses 2 to 2.5).
        gamma: target reward margin between chosen and rejected, in reward units.
    """

    beta: float = 2.0
    gamma: float = 1.0


@dataclass
class ORPOConfig:
    """``method: orpo``: SFT loss on the chosen response plus an odds-ratio term (Hong et al. 2024); no reference.

    Attributes:
        lam: weight of the odds-ratio term (the paper's lambda, TRL's ``beta``).
    """

    lam: float = 0.1


@dataclass
class KTOConfig:
    """``method: kto``: unpaired desirable / undesirable completions (Ethayarajh et al. 2024).

    Attributes:
        beta: KL strength.
        desirable_weight, undesirable_weight: lambda_D and lambda_U; keep lambda_D n_D / (lambda_U n_U) in
            [1, 4/3] when the classes are unbalanced.
        precompute_ref: as ``dpo.precompute_ref``.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref: bool = False


@dataclass
class RewardConfig:
    """``method: reward``: a scalar-head reward model trained on pairs with the Bradley-Terry loss.

    Attributes:
        center_coefficient: weight of the reward-centering term eta (r_c + r_r)^2 that keeps rewards near 0
            (0 disables; 0.01 is a common choice). A per-pair margin is read from a row's ``margin`` field.
    """

    center_coefficient: float = 0.0


@dataclass
class RolloutConfig:
    """What the online RL methods share (read from the ``grpo`` section for ``grpo | rloo``, from ``ppo`` for
    ``ppo``): how responses are sampled, how they are scored, and how often each rollout batch is reused.

    Attributes:
        max_new_tokens: longest response sampled, in tokens; default 64.
        temperature: sampling temperature (> 0); default 1.0.
        top_p: nucleus sampling mass in (0, 1]; default 1.0 (off).
        reward_functions: ``"module:function"`` or ``"path/to/file.py:function"`` specs of
            ``fn(prompt, response, row) -> float`` (see ``tuneforge.eval.functions``).
        reward_weights: one weight per reward function (default 1.0 each); the reward is the weighted sum.
        reward_model: a reward-model run directory (``method: reward``) whose score of (prompt, response) is
            added to the reward, times ``reward_model_weight``. At least one of functions and model is needed.
        reward_model_weight: its weight; default 1.0.
        clip_range: PPO clipping eps of the probability ratio pi / pi_old; default 0.2.
        ppo_epochs: passes of updates over each rollout batch (TRL's ``num_ppo_epochs``, GRPO's
            ``num_iterations``); with 1 pass and 1 mini-batch pi_old is the policy itself (ratio 1).
        mini_batches: optimiser updates per pass: the step's ``train.grad_accum`` micro-batches are split into
            this many groups, each one update (must divide ``train.grad_accum``); default 1.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    reward_functions: list = field(default_factory=list)
    reward_weights: Optional[list] = None
    reward_model: Optional[str] = None
    reward_model_weight: float = 1.0
    clip_range: float = 0.2
    ppo_epochs: int = 1
    mini_batches: int = 1


@dataclass
class GRPOConfig(RolloutConfig):
    """``method: grpo | rloo``: critic-free online RL; G responses are sampled per prompt, scored by reward
    functions (or a reward model), and each is reinforced by its advantage over the others of its group.
    Sampling, rewards and updates per rollout: see :class:`RolloutConfig`.

    Attributes:
        num_generations: G >= 2, responses sampled per prompt (the group); default 4.
        beta: KL coefficient to the reference (the model with the adapter off, or a frozen copy for full
            fine-tuning; k3 estimate); 0 disables; default 0.04.
        normalisation: ``token`` (every response token of the step weighs the same, DAPO) or ``sequence``
            (mean per response, then over responses, GRPO's eq. 3); default ``token``.
        scale_by_std: GRPO only: divide each group's centred rewards by its std (False: Dr. GRPO); RLOO never
            scales; default True.
    """

    num_generations: int = 4
    beta: float = 0.04
    normalisation: Literal["token", "sequence"] = "token"
    scale_by_std: bool = True


@dataclass
class PPOConfig(RolloutConfig):
    """``method: ppo``: one response per prompt, scored by a reward model (or functions); a KL penalty to the
    reference at every token; GAE advantages from a value head on the policy's hidden states; several clipped
    updates per rollout batch. Sampling, rewards, ``ppo_epochs`` and ``mini_batches``: see :class:`RolloutConfig`.

    Attributes:
        ppo_epochs: passes over each rollout batch; default 4 (TRL's).
        kl_coef: beta of the per-token penalty -beta (log pi - log ref); default 0.05.
        adaptive_kl: adapt beta after each rollout towards ``target_kl`` (Ziegler et al. 2019); default False.
        target_kl: the KL (nats per response) the adaptive controller aims at; default 6.0.
        kl_horizon: the controller's horizon in responses; default 10000.
        gamma: discount of GAE; default 1.0.
        lam: lambda of GAE; default 0.95.
        clip_range_value: clipping of the value prediction around its rollout value; default 0.2.
        vf_coef: weight of the value loss; default 0.1.
        whiten_advantages: normalise the step's advantages to mean 0, std 1; default True.
    """

    ppo_epochs: int = 4
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True


METHODS = ("sft", "reward", "dpo", "simpo", "orpo", "kto", "grpo", "rloo", "ppo")
ONLINE_METHODS = ("grpo", "rloo", "ppo")


@dataclass
class RunConfig:
    """A whole run: the method and its sections.

    ``method`` picks the recipe: ``sft`` (instruction tuning), ``reward`` (Bradley-Terry reward model), ``dpo``
    (with ``dpo.loss`` choosing DPO, IPO, cDPO, rDPO or hinge), ``simpo``, ``orpo`` (pairs), ``kto`` (unpaired
    rows), ``grpo`` / ``rloo`` (online RL from prompts and reward functions) or ``ppo`` (online RL with a value
    head). Each method reads its own section; the others are ignored.
    """

    method: Literal["sft", "reward", "dpo", "simpo", "orpo", "kto", "grpo", "rloo", "ppo"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict:
        """Plain values (what config.yaml holds); rows given in memory become their placeholder
        (``tuneforge.data.memory``)."""
        values = dataclasses.asdict(self)
        for section, key in (("data", "train"), ("data", "validation"), ("eval", "generation_data")):
            values[section][key] = recorded(values[section][key])
        return values

    @property
    def rollout(self) -> RolloutConfig:
        """The online RL section of this method: ``ppo`` for ppo, ``grpo`` for grpo and rloo."""
        return self.ppo if self.method == "ppo" else self.grpo


_RANGES: dict[str, tuple[float | None, float | None]] = {
    # key: (smallest allowed, largest allowed); None leaves that side open.
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
    "dpo.beta": (1e-6, None),
    "dpo.label_smoothing": (0.0, 0.49),
    "simpo.beta": (1e-6, None),
    "orpo.lam": (0.0, None),
    "kto.beta": (1e-6, None),
    "kto.desirable_weight": (0.0, None),
    "kto.undesirable_weight": (0.0, None),
    "reward.center_coefficient": (0.0, None),
    "grpo.num_generations": (2, None),
    "grpo.beta": (0.0, None),
    **{f"{section}.{key}": bounds for section in ("grpo", "ppo") for key, bounds in (
        ("max_new_tokens", (1, None)), ("temperature", (1e-6, None)), ("top_p", (1e-6, 1.0)),
        ("clip_range", (1e-6, None)), ("ppo_epochs", (1, None)), ("mini_batches", (1, None)))},
    "ppo.kl_coef": (0.0, None),
    "ppo.target_kl": (1e-6, None),
    "ppo.kl_horizon": (1, None),
    "ppo.gamma": (0.0, 1.0),
    "ppo.lam": (0.0, 1.0),
    "ppo.clip_range_value": (1e-6, None),
    "ppo.vf_coef": (0.0, None),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only where it is lossless and expected."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        # YAML 1.1 reads "2e-4" as a string; accept any string that is a plain number.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        # NaN passes every range check (all comparisons are false), so it is refused here.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return number
    if annotation is str:
        # Rows in memory stand where a data file's path does; only the Python API makes them (YAML cannot).
        if isinstance(value, (str, InMemoryRows)):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        annotation = hints[name]
        value = values[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(annotation):
            if value is None:  # a YAML section whose keys are all commented out
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(annotation, value, key + ".")
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _check_ranges(config: RunConfig) -> None:
    for key, (low, high) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}")
    _check_template(config.data.template)
    _check_quantization(config)
    _check_method(config)
    target = config.lora.target_modules
    if not (target == "all-linear" or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise ConfigError(f"lora.target_modules: expected 'all-linear' or a list of module names, got {target!r}")
    if len(config.train.betas) != 2 or not all(isinstance(b, (int, float)) for b in config.train.betas):
        raise ConfigError(f"train.betas: expected two numbers, got {config.train.betas!r}")
    if not config.eval.metric.startswith("val_"):
        raise ConfigError(f"eval.metric: {config.eval.metric!r} is not a validation metric; use val_loss, "
                          "val_perplexity or another logged val_* metric")
    config.eval.check(config.method, bool(config.data.validation) or config.data.val_fraction > 0,
                      config.distributed.strategy)
    known_loggers = ("tensorboard", "wandb", "mlflow", "trackio")
    for name in config.log.loggers:
        if name not in known_loggers:
            raise ConfigError(f"log.loggers: unknown logger {name!r}; use any of {', '.join(known_loggers)}")


def _check_quantization(config: RunConfig) -> None:
    if config.model.load_in == "none":
        return
    if not config.lora.enabled:
        # bitsandbytes weights are integer codes with no gradient: only adapters on top of them can train.
        raise ConfigError(f"model.load_in: a {config.model.load_in} base cannot be fully fine-tuned; set "
                          "lora.enabled=true (QLoRA) or model.load_in=none")
    if config.distributed.strategy == "fsdp":
        raise ConfigError(f"model.load_in: a {config.model.load_in} base is not supported with "
                          "distributed.strategy=fsdp; use ddp (every rank holds the whole quantized model)")


def _check_method(config: RunConfig) -> None:
    if config.dpo.label_smoothing and config.dpo.loss not in ("cdpo", "robust"):
        raise ConfigError(f"dpo.label_smoothing={config.dpo.label_smoothing} has no effect with "
                          f"dpo.loss={config.dpo.loss}; use dpo.loss=cdpo or robust, or set it to 0")
    if config.method != "sft" and config.data.packing:
        raise ConfigError(f"data.packing: method {config.method} compares whole sequences (one score or "
                          "log-prob per sequence); packing is for sft only")
    if config.method != "sft" and config.data.train_on_prompt:
        raise ConfigError(f"data.train_on_prompt: method {config.method} scores the responses only")
    _check_performance_options(config)
    if config.data.streaming:
        from tuneforge.data.streaming import check_streaming  # torch and the data stack: only when asked

        check_streaming(config)
    if config.method in ONLINE_METHODS:
        _check_online(config)


def _check_performance_options(config: RunConfig) -> None:
    """``data.group_by_length`` and ``train.compile`` against the method and the other options."""
    if config.data.group_by_length and config.data.packing:
        raise ConfigError("data.group_by_length and data.packing cannot both be on: packing already removes the "
                          "padding that grouping by length reduces; set one of them to false")
    if config.data.group_by_length and config.method in ONLINE_METHODS:
        raise ConfigError(f"data.group_by_length: method {config.method} batches prompts for sampling, which it "
                          "does not group; set data.group_by_length=false")
    if config.model.attn_implementation == "flex_attention" and config.method != "sft":
        raise ConfigError(f"model.attn_implementation=flex_attention: for method sft (packed rows get a block mask "
                          f"from their position ids); method {config.method} passes its own (seq, seq) masks, which "
                          "transformers' FlexAttention would read as scores; use sdpa")
    if config.train.compile and config.method != "sft":
        raise ConfigError(f"train.compile: supported for method sft only for now (method {config.method}); set "
                          "train.compile=false")
    if config.train.compile and config.distributed.strategy == "fsdp":
        raise ConfigError("train.compile: not supported with distributed.strategy=fsdp yet (FSDP shards each "
                          "decoder layer inside the compiled decoder); use ddp or set train.compile=false")


def _check_online(config: RunConfig) -> None:
    name, section = ("ppo" if config.method == "ppo" else "grpo"), config.rollout
    functions = section.reward_functions
    if not functions and not section.reward_model:
        raise ConfigError(f"{name}.reward_functions: method {config.method} needs a reward: at least one reward "
                          "function, e.g. ['tuneforge.eval.functions:exact_answer'] or ['rewards.py:my_reward'], "
                          f"or {name}.reward_model (a method: reward run directory)")
    if not all(isinstance(spec, str) and ":" in spec for spec in functions):
        raise ConfigError(f"{name}.reward_functions: expected 'module:function' or 'file.py:function' strings, got "
                          f"{functions!r}")
    weights = section.reward_weights
    if weights is not None:
        if len(weights) != len(functions) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ConfigError(f"{name}.reward_weights: expected {len(functions)} finite number(s), one per reward "
                              f"function, got {weights!r}")
    if config.train.grad_accum % section.mini_batches:
        raise ConfigError(f"{name}.mini_batches: {section.mini_batches} must divide train.grad_accum="
                          f"{config.train.grad_accum} (each mini-batch is a group of the step's micro-batches)")
    validates = bool(config.data.validation) or config.data.val_fraction > 0
    if validates and config.eval.metric in ("val_loss", "val_perplexity"):
        raise ConfigError(f"eval.metric: method {config.method} evaluates by generating, and logs val_reward "
                          f"(no {config.eval.metric}); set eval.metric=val_reward")
    if config.distributed.strategy == "fsdp":
        raise ConfigError(f"distributed.strategy: method {config.method} generates with the unsharded model, so it "
                          "runs with ddp only for now; set distributed.strategy=ddp")


def _check_template(spec: str) -> None:
    if spec in TEMPLATE_NAMES:
        return
    if is_template_path(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"data.template: template file {spec} does not exist")
        return
    close = difflib.get_close_matches(spec, TEMPLATE_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"data.template: unknown template {spec!r}{hint}; use {', '.join(TEMPLATE_NAMES)}, "
                      "or the path of a .jinja file")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=8"`` -> (["lora", "r"], 8). The value is read as YAML, so ``true``, ``1e-4``, ``[a, b]`` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (for example train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught later by :func:`config_from_dict`."""
    result = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def config_from_dict(values: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig`; raises :class:`ConfigError` naming the offending key."""
    if not isinstance(values, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(values).__name__}")
    config = _build(RunConfig, translate_aliases(values), "")  # Hugging Face names (learning_rate) first
    _check_ranges(config)
    check_data_value(config.data.train, "data.train", required=True)
    check_data_value(config.data.validation, "data.validation")
    check_data_value(config.eval.generation_data, "eval.generation_data")
    return config


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """The mapping a YAML file holds; a missing file, invalid YAML or another shape is a :class:`ConfigError`
    naming the file (``what`` names the kind of file, ``shape`` says what it must hold)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {shape}")
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate.

    Paths written in the file are relative to the file's folder, paths in ``overrides`` to the working directory;
    both come out absolute (``tuneforge.paths``). Hub ids and template names stay as written.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        values = translate_aliases(read_yaml_mapping(path, "config file", "the config must be a mapping of sections"))
        values = resolve_paths(values, path.parent, RUN_CONFIG_PATHS)
    overrides = translate_overrides(overrides or [])  # before the paths they set are resolved
    values = apply_overrides(values, overrides)
    changed = overridden_keys(RUN_CONFIG_PATHS, [".".join(parse_override(text)[0]) for text in overrides])
    values = resolve_paths(values, Path.cwd(), RUN_CONFIG_PATHS, only=changed)
    return config_from_dict(values)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_options() -> str:
    """One line per option: dotted key, type and default (for ``--help``)."""
    lines = []
    for section in dataclasses.fields(RunConfig):
        if section.name == "method":
            lines.append(f"  method ({' | '.join(METHODS)}) = 'sft'")
            continue
        cls = typing.get_type_hints(RunConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            hint = hints[f.name]
            if get_origin(hint) is Literal:
                kind = " | ".join(str(choice) for choice in get_args(hint))
            else:
                kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            lines.append(f"  {section.name}.{f.name} ({kind}) = {default!r}")
    return "\n".join(lines) + describe_aliases()

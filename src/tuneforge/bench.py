"""``tuneforge bench``: throughput, peak memory and model FLOPs utilisation of a short training workload.

The workload goes through the same code as ``tuneforge train`` (data pipeline, the method's recipe, the trainer's
``train_step``); only the timing harness is here. Which workload a method gets is its spec's question
(``tuneforge.recipes.registry``): online methods sample from addition prompts, methods on pairs get synthetic
pairs, methods on rows synthetic rows (or alpaca-shaped ones: ``rows_shape``), and a method that distils from a
teacher answers the synthetic rows' prompts with the benched model as its own teacher. One warm-up step is
excluded from the timing.

Model FLOPs per processed token (padding excluded), N = matmul parameters of the base model including the
output head and excluding the embedding lookup:
    full fine-tuning: 6·N,   LoRA: 4·N + 6·N_lora   (LoRA skips weight gradients of the frozen base)
plus the causal attention-score term 6·layers·hidden·T/2·2 = 6·layers·hidden·T (QKᵀ and AV, forward and twice
backward, half of the T×T scores under the causal mask), with T the row's length. MFU divides achieved model
FLOP/s by a matmul peak measured in the same process for the same dtype. :func:`model_flops` and
:func:`attention_flops` are the count, shared with benchmarks/trl_sft.py so that TRL's MFU is counted alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError
from tuneforge.recipes.registry import MethodSpec, get, methods

_WORDS = ("river stone lantern harbour copper meadow signal window orbit garden quiet market bridge paper "
          "engine winter silver forest cable ladder island morning thunder velvet canyon mirror pocket "
          "rocket saddle temple violet walnut yellow zephyr anchor basket candle desert feather glacier "
          "hammer ivory jacket kettle lemon marble needle orange pepper quartz ribbon salmon tunnel").split()


def synthetic_rows(count: int = 64, seed: int = 0) -> list[dict]:
    """Fixed prompt/completion rows of varied length (about 60 to 250 tokens with SmolLM2's tokenizer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(15, 60)))
        completion = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(30, 120)))
        rows.append({"prompt": f"Repeat and continue: {prompt}", "completion": completion.capitalize() + "."})
    return rows


_TOPICS = ("the water cycle", "compound interest", "a healthy breakfast", "photosynthesis", "remote work",
           "public transport", "a small garden", "machine learning", "the history of paper", "saving energy at home",
           "learning a new language", "the solar system", "good sleep habits", "a city library", "recycling",
           "time management", "ocean tides", "a job interview", "volcanoes", "team meetings", "baking bread",
           "climate change", "a budget for students", "the first computers", "bird migration", "healthy habits",
           "a mountain hike", "online privacy", "electric cars", "the human heart")
_OPENINGS = ("Explain {topic} to a beginner", "Write a short story about {topic}", "List five facts about {topic}",
             "Summarise the main ideas of {topic}", "Describe {topic} in simple terms",
             "Give three tips for {topic}", "Write a short poem about {topic}", "Compare {topic} and {other}",
             "Suggest a plan for {topic}", "Write a short email about {topic}", "Classify the following into groups",
             "Rewrite the following sentence in a formal tone", "Explain why {topic} matters")
_CLAUSES = ("for a general audience", "in a friendly tone", "using plain words", "with one clear example",
            "in no more than a few sentences", "as if talking to a child", "for a school newsletter",
            "and keep it practical", "and mention one common mistake", "with a short conclusion at the end")
_SUBJECTS = ("It", "This", "Each person", "A simple approach", "The main idea", "One useful step", "In practice, it",
             "A good example", "The result", "An expert", "Over time, this", "The first thing")
_VERBS = ("helps", "shows", "changes", "depends on", "improves", "explains", "affects", "needs", "brings",
          "creates", "reduces", "supports")
_OBJECTS = ("the way we plan our day", "how energy moves through a system", "a clear and steady routine",
            "the cost of everyday choices", "small changes that add up", "the balance between speed and care",
            "what happens when conditions change", "the needs of the people involved", "a better understanding",
            "the quality of the final result", "simple tools and good habits", "the time it takes to learn")
_ENDINGS = ("", "", " over many years", " in most cases", " when it is done well", " for everyone involved",
            " at home and at work", " without much extra effort", " from the very start", " step by step")


def alpaca_rows(count: int = 64, seed: int = 0) -> list[dict]:
    """Fixed prompt/completion rows shaped like alpaca: an instruction of about 8 to 30 words ("Explain ...",
    "Write a short ...", "List ...", "Summarise ..."), for about 40% of rows a short input part after it, and an
    output of about 60 to 200 words of plain English sentences (about 100 to 300 tokens per row with SmolLM2's
    tokenizer, mostly completion). Offline and deterministic for a ``seed``, like :func:`synthetic_rows`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic, other = rng.sample(_TOPICS, 2)
        words = rng.choice(_OPENINGS).format(topic=topic, other=other).split()
        for clause in rng.sample(_CLAUSES, len(_CLAUSES)):
            if len(words) >= rng.randint(8, 30):
                break
            words += clause.split()
        prompt = " ".join(words) + "."
        if rng.random() < 0.4:
            extra = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 25)))
            prompt += f"\n\nInput: {extra.capitalize()}."
        target, output = rng.randint(60, 200), []
        while sum(len(sentence.split()) for sentence in output) < target:
            output.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                          f"{rng.choice(_ENDINGS)}.")
        rows.append({"prompt": prompt, "completion": " ".join(output)})
    return rows


ROW_SETS = {"synthetic": synthetic_rows, "alpaca": alpaca_rows}


def synthetic_pairs(count: int = 64, seed: int = 0) -> list[dict]:
    """Fixed preference pairs of varied length: a prompt of 15 to 60 words, a chosen completion of 20 to 80 words
    and a rejected one of 30 to 110 (about 100 to 250 tokens per side with SmolLM2's tokenizer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(15, 60)))
        chosen = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 80)))
        rejected = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(30, 110)))
        rows.append({"prompt": f"Repeat and continue: {prompt}", "chosen": chosen.capitalize() + ".",
                     "rejected": rejected.capitalize() + "!"})
    return rows


def synthetic_prompts(count: int = 64, seed: int = 0) -> list[dict]:
    """Fixed addition prompts with their sums as ``answer`` (online methods: the reward is the exact answer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def brevity(prompt: str, response: str, row: dict) -> float:
    """The online workload's tie-breaker beside ``exact_answer``: minus the response's length in thousandths of a
    point, so two samples rarely score the same and online DPO (which skips tied pairs) times its update too."""
    return -len(response) / 1000.0


def native_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` multiplies ``dtype`` natively. A CPU without bf16 instructions (AVX2 only) emulates bf16
    matmuls: a 2048-square product takes minutes, and the "peak" it gives is no peak to measure MFU against."""
    return not (device.type == "cpu" and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int | None = None,
                        repeats: int = 5) -> float | None:
    """Best FLOP/s of a square matmul of ``size`` in ``dtype`` (the denominator of MFU): 2048 on a CPU, 8192 on a
    GPU, where smaller products leave the chip partly idle (an H200 gives about half its bf16 rate at 2048).
    None where the device has no native ``dtype`` matmul (:func:`native_matmul`): MFU is then not reported."""
    if not native_matmul(dtype, device):
        return None
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters of the base model's linear layers, output head included, LoRA adapters excluded."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            # A 4-bit weight (bitsandbytes) is stored packed, two values a byte: count its logical shape.
            quant_state = getattr(module.weight, "quant_state", None)
            total += quant_state.shape.numel() if quant_state is not None else module.weight.numel()
    return total


def lora_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def attention_flops(layers: int, hidden: int, lengths) -> float:
    """Causal attention-score FLOPs of rows of ``lengths`` tokens, forward and backward: 6·layers·hidden·Σ T²
    (6·layers·hidden·T per token of a row of T)."""
    return 6.0 * layers * hidden * sum(float(t) * float(t) for t in lengths)


def model_flops(n_matmul: int, n_lora: int, full: bool, tokens: int, attention: float = 0.0) -> float:
    """Model FLOPs of training on ``tokens`` real tokens (the module docstring's count, shared with
    benchmarks/trl_sft.py): 6·N per token for full fine-tuning, 4·N + 6·N_lora for LoRA, plus ``attention``
    (:func:`attention_flops`)."""
    per_token = 6 * n_matmul if full else 4 * n_matmul + 6 * n_lora
    return per_token * tokens + attention


def run_bench(method: str = "sft", model: str = "default", data: str | None = None, batch_size: int = 4,
              max_length: int = 256, steps: int = 5, lora_r: int = 16, dtype: str = "float32",
              packing: bool = False, full: bool = False, gradient_checkpointing: bool = False,
              load_in: str = "none", precompute_ref: bool = False, generations: int = 4,
              max_new_tokens: int = 32, model_dtype: str = "float32", attn_implementation: str = "sdpa",
              loss_chunk_size: int = 256, rows: int = 64, warmup_steps: int = 1, compile: bool = False,
              checkpoint_fraction: float = 1.0, rows_shape: str = "synthetic", fused_lora: bool = True,
              fused_activations: bool = True) -> dict:
    """Dispatch to the method's bench. ``dtype`` is the compute dtype (``bfloat16`` = bf16 autocast),
    ``model_dtype`` the dtype the weights are stored in (``bfloat16`` halves a frozen LoRA base), ``rows`` the
    number of synthetic rows when no ``data`` file is given, ``warmup_steps`` the untimed steps first (more than
    one where shapes vary and a compiler specialises on the first ones: FlexAttention, train.compile).
    ``rows_shape`` picks the SFT rows (``synthetic``: :func:`synthetic_rows`, ``alpaca``: :func:`alpaca_rows`);
    ``fused_lora`` and ``fused_activations`` set ``lora.fused`` and ``train.fused_activations``."""
    model_options = {"dtype": model_dtype, "attn_implementation": attn_implementation}
    if load_in == "4bit":  # the 4-bit base is dequantised to the compute dtype for each matmul
        model_options["compute_dtype"] = dtype
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, not {warmup_steps}")
    if rows_shape not in ROW_SETS:
        raise ValueError(f"rows_shape must be one of {', '.join(ROW_SETS)}, not {rows_shape!r}")
    train_options = {"loss_chunk_size": loss_chunk_size, "compile": compile,
                     "checkpoint_fraction": checkpoint_fraction, "fused_activations": fused_activations}
    lora_options = {"fused": fused_lora}
    switches = {"fused_lora": fused_lora, "fused_activations": fused_activations}
    spec = get(method)
    if rows_shape != "synthetic" and (_has_option(spec, "teacher") or spec.online or spec.data != "rows"):
        raise ConfigError(f"bench: --row-set {rows_shape} applies to methods on rows (sft); method {method} "
                          "keeps its own workload (synthetic pairs, addition prompts or synthetic rows)")
    if _has_option(spec, "teacher"):
        return {**run_distill_bench(method, model, data, batch_size, max_length, steps, lora_r, dtype, full,
                                    gradient_checkpointing, load_in, max_new_tokens, model_options=model_options,
                                    train_options=train_options, warmup_steps=warmup_steps,
                                    lora_options=lora_options), **switches}
    if spec.online:
        return {**run_online_bench(method, model, data, batch_size, max_length, steps, lora_r, dtype, full,
                                   gradient_checkpointing, load_in, generations, max_new_tokens,
                                   model_options=model_options, train_options=train_options,
                                   warmup_steps=warmup_steps, lora_options=lora_options), **switches}
    if spec.data == "pairs":
        return {**run_preference_bench(method, model, data, batch_size, max_length, steps, lora_r, dtype, full,
                                       gradient_checkpointing, load_in, precompute_ref, model_options=model_options,
                                       train_options=train_options, warmup_steps=warmup_steps,
                                       lora_options=lora_options), **switches}
    if spec.data != "rows":
        benched = ", ".join(name for name, other in methods().items()
                            if other.online or other.data in ("rows", "pairs"))
        raise ConfigError(f"bench: method {method} trains on {spec.data} rows, for which the bench has no synthetic "
                          f"workload; use one of {benched}")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _set_up(scratch, lambda: ROW_SETS[rows_shape](rows), method, model, data, batch_size, max_length,
                          steps, lora_r, dtype, full, gradient_checkpointing, load_in, lr=1e-4,
                          data_options={"packing": packing}, model_options=model_options,
                          train_options=train_options, warmup_steps=warmup_steps, lora_options=lora_options)
        counts = {"tokens": 0, "trained": 0, "attention_flops": 0.0}
        cfg = trainer.model.config

        def count(batch) -> None:
            counts["tokens"] += batch.num_tokens
            counts["trained"] += batch.num_trained
            lengths = batch.position_ids.max(dim=1).values + 1 if not packing else None
            counts["attention_flops"] += _attention_flops(batch, cfg, lengths)

        elapsed = _time_steps(trainer, steps, count, warmup_steps)
        n_matmul = matmul_parameters(trainer.model)
        n_lora = lora_parameters(trainer.model)
        flops = model_flops(n_matmul, n_lora, full, counts["tokens"], counts["attention_flops"])
        peak = measure_matmul_peak(torch.bfloat16 if dtype == "bfloat16" else torch.float32, trainer.device)
        return {
            "method": method, "model": model, "dtype": dtype, "model_dtype": model_dtype,
            "attn_implementation": attn_implementation, "mode": "full" if full else f"lora-r{lora_r}",
            "batch_size": batch_size, "max_length": max_length, "packing": packing, "steps": steps,
            "gradient_checkpointing": gradient_checkpointing, "checkpoint_fraction": checkpoint_fraction,
            "load_in": load_in, "compile": compile, "row_set": rows_shape if data is None else "file", **switches,
            "tokens_per_s": round(counts["tokens"] / elapsed, 2),
            "trained_tokens_per_s": round(counts["trained"] / elapsed, 2),
            "step_time_s": round(elapsed / steps, 4),
            "mfu": round(flops / elapsed / peak, 4) if peak else None,
            "model_gflop_per_s": round(flops / elapsed / 1e9, 2),
            "matmul_peak_gflop_per_s": round(peak / 1e9, 2) if peak else None,
            "matmul_params": n_matmul, "lora_params": n_lora,
            **_memory_and_machine(trainer.device), "cpus": os.cpu_count(),
        }


def run_preference_bench(method: str, model: str, data: str | None, batch_size: int, max_length: int, steps: int,
                         lora_r: int, dtype: str, full: bool, gradient_checkpointing: bool, load_in: str,
                         precompute_ref: bool, model_options: dict | None = None,
                         train_options: dict | None = None, warmup_steps: int = 1,
                         lora_options: dict | None = None) -> dict:
    """Pairs/s, tokens/s and peak memory of training a method on pairs (dpo, simpo, orpo, reward ...).

    Model FLOPs count the policy's forward and backward on both sides of each pair (4·N per token for LoRA, 6·N
    for full) plus, when a reference runs in line (a method with a reference, without ``precompute_ref``), its
    forward (2·N). ``precompute_ref`` applies to a method whose section has that option.
    """
    spec = get(method)
    precompute_ref = precompute_ref and _has_option(spec, "precompute_ref")
    with tempfile.TemporaryDirectory() as scratch:
        setup_start = time.perf_counter()
        # Setup includes the reference pass over the data when precompute_ref is on.
        trainer = _set_up(scratch, synthetic_pairs, method, model, data, batch_size, max_length, steps, lora_r,
                          dtype, full, gradient_checkpointing, load_in, lr=1e-5,
                          sections={spec.section: {"precompute_ref": True}} if precompute_ref else None,
                          model_options=model_options, train_options=train_options, warmup_steps=warmup_steps,
                          lora_options=lora_options)
        setup_s = time.perf_counter() - setup_start
        counts = {"pairs": 0, "tokens": 0}

        def count(batch) -> None:
            counts["pairs"] += batch.num_pairs
            counts["tokens"] += batch.sequences.num_tokens

        elapsed = _time_steps(trainer, steps, count, warmup_steps)
        n_matmul = matmul_parameters(trainer.model)
        n_lora = lora_parameters(trainer.model)
        per_token = 6 * n_matmul if full else 4 * n_matmul + 6 * n_lora
        if spec.reference and not precompute_ref:
            per_token += 2 * n_matmul
        peak = measure_matmul_peak(torch.bfloat16 if dtype == "bfloat16" else torch.float32, trainer.device)
        return {
            "method": method, "model": model, "dtype": dtype, "mode": "full" if full else f"lora-r{lora_r}",
            "batch_size": batch_size, "max_length": max_length, "steps": steps, "precompute_ref": precompute_ref,
            "gradient_checkpointing": gradient_checkpointing, "load_in": load_in,
            "checkpoint_fraction": (train_options or {}).get("checkpoint_fraction", 1.0),
            "pairs_per_s": round(counts["pairs"] / elapsed, 3), "tokens_per_s": round(counts["tokens"] / elapsed, 2),
            "step_time_s": round(elapsed / steps, 4), "setup_s": round(setup_s, 2),
            "mfu": round(per_token * counts["tokens"] / elapsed / peak, 4) if peak else None,
            **_memory_and_machine(trainer.device),
        }


def run_online_bench(method: str, model: str, data: str | None, batch_size: int, max_length: int, steps: int,
                     lora_r: int, dtype: str, full: bool, gradient_checkpointing: bool, load_in: str,
                     generations: int, max_new_tokens: int, model_options: dict | None = None,
                     train_options: dict | None = None, warmup_steps: int = 1,
                     lora_options: dict | None = None) -> dict:
    """Steps/s of an online method (grpo, rloo, ppo, online_dpo ...) on addition prompts, and where the time goes.

    A step samples ``generations`` responses (for a method whose section has ``num_generations``; else its own
    count: 1 for PPO, 2 for online DPO) of at most ``max_new_tokens`` for each of ``batch_size`` prompts, scores
    them (the exact sum, with :func:`brevity` breaking ties), and updates (``ppo_epochs`` passes for PPO).
    ``sample_share`` is the fraction of the step spent in the generation engine; ``generated_tokens_per_s`` counts
    response tokens over the whole step. No MFU: decoding is bound by weight bandwidth, not matmul throughput.
    """
    spec = get(method)
    options = {"max_new_tokens": max_new_tokens, "temperature": 1.0,
               "reward_functions": ["tuneforge.rewards.functions:exact_answer", "tuneforge.bench:brevity"]}
    if _has_option(spec, "num_generations"):
        options["num_generations"] = generations
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _set_up(scratch, synthetic_prompts, method, model, data, batch_size, max_length, steps, lora_r,
                          dtype, full, gradient_checkpointing, load_in, lr=1e-5, sections={spec.section: options},
                          model_options=model_options, train_options=train_options, warmup_steps=warmup_steps,
                          lora_options=lora_options)
        recipe = trainer.recipe
        engine, sampling = recipe.engine, {"s": 0.0}
        timed_sample = _timed(engine.sample, sampling)

        counts = {"prompts": 0, "responses": 0, "generated": 0, "tokens": 0}

        def count(batch) -> None:
            counts["prompts"] += len(batch)
            for rollout in recipe.last_rollouts:
                counts["responses"] += rollout.samples.mask.shape[0]
                counts["generated"] += int(rollout.samples.mask.sum())
                counts["tokens"] += int(rollout.samples.attention_mask.sum())

        batches = trainer.epoch_batches(shuffle=False)
        for index in range(warmup_steps):  # untimed; _time_steps cannot make them: timing is wrapped in between
            trainer.train_step([batches[index % len(batches)]])
        engine.sample = timed_sample
        elapsed = _time_steps(trainer, steps, count, warm_up=0)
        return {
            "method": method, "model": model, "dtype": dtype, "mode": "full" if full else f"lora-r{lora_r}",
            "batch_size": batch_size, "generations": trainer.config.method_section.samples_per_prompt,
            "max_new_tokens": max_new_tokens,
            "steps": steps, "step_time_s": round(elapsed / steps, 4),
            "prompts_per_s": round(counts["prompts"] / elapsed, 3),
            "responses_per_s": round(counts["responses"] / elapsed, 3),
            "generated_tokens_per_s": round(counts["generated"] / elapsed, 2),
            "tokens_per_s": round(counts["tokens"] / elapsed, 2),
            "sample_share": round(sampling["s"] / elapsed, 3),
            **_memory_and_machine(trainer.device),
        }


def run_distill_bench(method: str, model: str, data: str | None, batch_size: int, max_length: int, steps: int,
                      lora_r: int, dtype: str, full: bool, gradient_checkpointing: bool, load_in: str,
                      max_new_tokens: int, model_options: dict | None = None, train_options: dict | None = None,
                      warmup_steps: int = 1, lora_options: dict | None = None) -> dict:
    """Steps/s of a method that distils from a teacher (gkd) on the synthetic rows, every micro-batch on-policy
    (the student answers each prompt with at most ``max_new_tokens``, then student and teacher score the answer:
    the costly case), with the benched model as its own teacher (the cost of a teacher of the student's size).

    ``tokens_per_s`` counts prompt + response tokens through the student (and the teacher), ``generated_tokens_per_s``
    the sampled ones, ``sample_share`` the fraction of the step spent in the generation engine. No MFU: decoding is
    bound by weight bandwidth, not matmul throughput.
    """
    spec = get(method)
    options = {"teacher": model, "lmbda": 1.0, "max_new_tokens": max_new_tokens}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _set_up(scratch, synthetic_rows, method, model, data, batch_size, max_length, steps, lora_r,
                          dtype, full, gradient_checkpointing, load_in, lr=1e-5, sections={spec.section: options},
                          model_options=model_options, train_options=train_options, warmup_steps=warmup_steps,
                          lora_options=lora_options)
        recipe = trainer.recipe
        batches = trainer.epoch_batches(shuffle=False)
        for index in range(warmup_steps):  # untimed; _time_steps cannot make them: timing is wrapped in between
            trainer.train_step([batches[index % len(batches)]])
        engine, sampling = recipe.engine, {"s": 0.0}
        timed_sample = _timed(engine.sample, sampling)

        counts = {"prompts": 0, "tokens": 0, "generated": 0, "on_policy": 0, "batches": 0}

        def count(batch) -> None:
            counts["prompts"] += len(batch)
            for trained, on_policy in zip(recipe.last_batches, recipe.last_on_policy):
                counts["tokens"] += trained.num_tokens
                counts["generated"] += trained.num_trained if on_policy else 0
                counts["on_policy"] += int(on_policy)
                counts["batches"] += 1

        engine.sample = timed_sample
        elapsed = _time_steps(trainer, steps, count, warm_up=0)
        return {
            "method": method, "model": model, "dtype": dtype, "mode": "full" if full else f"lora-r{lora_r}",
            "batch_size": batch_size, "max_length": max_length, "max_new_tokens": max_new_tokens, "steps": steps,
            "step_time_s": round(elapsed / steps, 4), "prompts_per_s": round(counts["prompts"] / elapsed, 3),
            "tokens_per_s": round(counts["tokens"] / elapsed, 2),
            "generated_tokens_per_s": round(counts["generated"] / elapsed, 2),
            "sample_share": round(sampling["s"] / elapsed, 3),
            "on_policy": round(counts["on_policy"] / max(counts["batches"], 1), 3),
            **_memory_and_machine(trainer.device),
        }


def _timed(sample, seconds: dict):
    """``sample`` that adds the time each call takes to ``seconds["s"]`` (the bench's sampling share)."""
    def timed_sample(*args, **kwargs):
        start = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            seconds["s"] += time.perf_counter() - start

    return timed_sample


def _has_option(spec: MethodSpec, name: str) -> bool:
    """Whether the method's own section has the option ``name``."""
    return spec.section_class is not None and name in {f.name for f in dataclasses.fields(spec.section_class)}


def _set_up(scratch: str, synthetic, method: str, model: str, data: str | None, batch_size: int, max_length: int,
            steps: int, lora_r: int, dtype: str, full: bool, gradient_checkpointing: bool, load_in: str, lr: float,
            data_options: dict | None = None, sections: dict | None = None, model_options: dict | None = None,
            train_options: dict | None = None, warmup_steps: int = 1, lora_options: dict | None = None):
    """A trainer of ``method`` set up for ``steps`` + ``warmup_steps`` steps on ``data`` (or the ``synthetic()``
    rows written to ``scratch``), rows in file order, writing no run directory."""
    from tuneforge.engine.trainer import Trainer  # torch, transformers and the model stack: only when benching

    if data is None:
        data = str(Path(scratch) / "bench.jsonl")
        Path(data).write_text("".join(json.dumps(r) + "\n" for r in synthetic()))
    config = config_from_dict({
        "method": method,
        "model": {"name_or_path": model, "dtype": "float32", "load_in": load_in, **(model_options or {})},
        "data": {"train": data, "max_length": max_length, "shuffle": False, **(data_options or {})},
        "lora": {"enabled": not full, "r": lora_r, "alpha": 2 * lora_r, **(lora_options or {})},
        "train": {"output_dir": str(Path(scratch) / "run"), "batch_size": batch_size, "epochs": 1000,
                  "max_steps": steps + warmup_steps, "lr": lr, "seed": 0,
                  "mixed_precision": "bf16" if dtype == "bfloat16" else "no",
                  "gradient_checkpointing": gradient_checkpointing, **(train_options or {})},
        **(sections or {}),
    })
    trainer = Trainer(config, log=lambda message: None, show_progress=False, run_dir=False)
    trainer.setup()
    return trainer


def _time_steps(trainer, steps: int, count, warm_up: int = 1) -> float:
    """Seconds for ``steps`` optimiser steps of one micro-batch each, after ``warm_up`` untimed steps (allocator,
    kernels, autograd graph caches, compilation; 0 when the caller made them); ``count(batch)`` is called for each
    timed micro-batch, after its step. The data is cycled so any number of steps can be timed."""
    batches = trainer.epoch_batches(shuffle=False)
    plan = [[batches[i % len(batches)]] for i in range(steps + warm_up)]
    device = trainer.device
    for window in plan[:warm_up]:
        trainer.train_step(window)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for window in plan[warm_up:]:
        loss, _ = trainer.train_step(window)
        for batch in window:
            count(batch)
    loss.item()  # one sync at the end
    _sync(device)
    return time.perf_counter() - start


def _memory_and_machine(device: torch.device) -> dict:
    """Peak memory of the process (and of the GPU) and what it ran on."""
    result = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["max_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def _attention_flops(batch, cfg, lengths) -> float:
    """6·layers·hidden·Σ T_i² over the samples of the batch (causal scores, forward + backward)."""
    if lengths is None:  # packed: per-sample lengths from position-id restarts
        lengths = packed_lengths(batch.position_ids)
    else:
        lengths = lengths.tolist()
    return attention_flops(cfg.num_hidden_layers, cfg.hidden_size, lengths)


def packed_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the samples packed into each row of ``position_ids`` (a sample starts where positions restart
    at 0); also used by benchmarks/trl_sft.py on TRL's padding-free batches."""
    sizes = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]):
        idx = torch.nonzero(row == 0).flatten().tolist() + [len(row)]
        sizes += [b - a for a, b in zip(idx[:-1], idx[1:])]
    return sizes

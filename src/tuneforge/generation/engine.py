"""The token-level core of generation: token ids in, token ids out, each response cut at its first stop token.

Everything that samples from a model goes through :class:`HFEngine` (``Generator`` for ``tuneforge generate``,
``chat``, ``eval`` and ``eval.generation_data``; the rollouts of online RL): one place builds the
``GenerationConfig``, pads the prompts, calls ``generate`` and trims the responses. Online RL talks to an engine
through the :class:`RolloutEngine` protocol, the seam for a faster one (vLLM on a GPU, say).

The sampler is exactly softmax(z / T) with nucleus ``top_p`` (``top_k`` off, no repetition penalty): what a
checkpoint's own ``generation_config.json`` sets is not applied, so the same settings mean the same sampler for
every model, and online RL's log-probs (``recipes._online.response_forward``) are those of the policy that sampled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig

from tuneforge.data.templates import Template
from tuneforge.engine.step import autocast
from tuneforge.models.adapters import causal_lm


@dataclass
class SamplingSettings:
    """How one call samples: ``max_new_tokens``, greedy or (temperature, top_p) sampling, and ``seed``: what the
    call's random draws are a function of (an engine seeds its sampler with it; None: torch's global generator)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None

    @classmethod
    def from_temperature(cls, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                         seed: int | None = None) -> "SamplingSettings":
        """The user-facing form: greedy at ``temperature`` 0, else sampling at ``temperature`` with ``top_p``."""
        if temperature <= 0:
            return cls(max_new_tokens, greedy=True, seed=seed)
        return cls(max_new_tokens, temperature, top_p, seed=seed)


def generation_config(settings: SamplingSettings, stop_ids: Sequence[int], pad_id: int) -> GenerationConfig:
    """The ``GenerationConfig`` of ``settings``: stopping at any of ``stop_ids``, with the KV cache. ``top_k=0``
    turns off transformers' default top-50, so sampling is softmax(z / T) with top-p alone."""
    sampling = {"do_sample": False} if settings.greedy else \
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, eos_token_id=list(stop_ids),
                            pad_token_id=pad_id, use_cache=True, **sampling)


@contextmanager
def seeded_global_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside the block torch's global generators (the CPU's and ``device``'s) start from ``seed``; after it they
    are as they were. HF ``generate`` samples only from the global generator: this makes its draws a function of
    ``seed`` alone and leaves the run's global stream (dropout, user code; restored on resume) untouched. With
    ``seed`` None nothing changes."""
    if seed is None:
        yield
        return
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else None):
        torch.manual_seed(seed)
        yield


def stop_ids(tokenizer, template: Template) -> list[int]:
    """Token ids that end an assistant turn: EOS and the template's end-of-turn tokens (those that are one token)."""
    ids = {tokenizer.eos_token_id}
    for text in template.stop_strings():
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.add(pieces[0])
    return sorted(i for i in ids if i is not None)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt), padded on the left so generation continues
    every row from the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


def response_mask(responses: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, stopped) of generated tokens ``responses`` (batch, T): mask is 1 up to and including the first stop
    token (so a trained model learns to stop), 0 after it (``generate`` pads finished rows, often with EOS
    itself); stopped is True for rows that contain a stop token."""
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids), device=responses.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    return (stops_before == 0).long(), is_stop.any(dim=1)


class RolloutEngine(Protocol):
    """What online RL needs of a generation engine (the seam for a faster one, e.g. vLLM on a GPU).

    ``sample`` returns, for each prompt in order, ``generations`` responses as token ids: each ends at its first
    stop token (kept) or after ``settings.max_new_tokens`` tokens; given the same weights, prompts and
    ``settings.seed`` it should draw the same responses (what makes a resumed run exact). ``sync`` is called
    after each step's updates, so an engine holding its own copy of the weights can take the new ones (the
    default engine generates with the policy itself and has nothing to do).
    """

    def sample(self, prompts: Sequence[Sequence[int]], generations: int,
               settings: SamplingSettings) -> list[list[int]]: ...

    def sync(self, model: torch.nn.Module) -> None: ...


class HFEngine:
    """The default engine: transformers' ``generate`` on ``model`` itself (a LoRA adapter on), batched with left
    padding and a KV cache, in eval mode (activation checkpointing turns the cache off in training mode), under
    bf16 autocast when ``bf16``; sampling draws from torch's global generators seeded with ``settings.seed``
    (then put back)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, stop_ids: Sequence[int], device: torch.device,
                 bf16: bool = False):
        self.model, self.pad_id, self.stop_ids, self.device, self.bf16 = model, pad_id, list(stop_ids), device, bf16

    def sample(self, prompts: Sequence[Sequence[int]], generations: int,
               settings: SamplingSettings) -> list[list[int]]:
        return self.generate(prompts, settings, generations)

    def sync(self, model: torch.nn.Module) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, generations: int = 1,
                 **hooks: Any) -> list[list[int]]:
        """``generations`` responses to each prompt (consecutive: rows ``i * G .. i * G + G - 1`` answer prompt
        ``i``), each up to and including its first stop token. ``hooks`` go to ``generate`` as they are
        (``streamer``, ``stopping_criteria``)."""
        input_ids, attention = left_pad(prompts, self.pad_id)
        input_ids = input_ids.repeat_interleave(generations, dim=0).to(self.device)
        attention = attention.repeat_interleave(generations, dim=0).to(self.device)
        config = generation_config(settings, self.stop_ids, self.pad_id)
        # transformers fills what a passed config leaves at its default from the checkpoint's generation_config
        # (a repetition penalty, a top-k): a neutral one stands in while generating (see the module docstring).
        lm = causal_lm(self.model)
        checkpoint_config, lm.generation_config = lm.generation_config, GenerationConfig()
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.device, self.bf16), seeded_global_rng(settings.seed, self.device):
                sequences = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                                generation_config=config, **hooks)
        finally:
            self.model.train(was_training)
            lm.generation_config = checkpoint_config
        responses = sequences[:, input_ids.shape[1]:]
        # generate pads finished rows (often with EOS itself): keep each row up to its first stop token.
        mask, _ = response_mask(responses, self.stop_ids)
        return [row[:length] for row, length in zip(responses.tolist(), mask.sum(dim=1).tolist())]

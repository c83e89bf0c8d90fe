"""Load a model or run for generation, and generate with the same template as training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import Template, load_template, template_from_dict
from tuneforge.data.tokenize import encode_prompt
from tuneforge.engine.step import pick_device
from tuneforge.models.loading import ModelSource, load_model, load_tokenizer, resolve_model


def tokenizer_and_template(source: ModelSource, template: str | None = None) -> tuple[object, Template]:
    """The tokenizer of ``source`` and the template to render with: ``template`` when given, else a run's own
    (saved in its run directory), else the tokenizer's."""
    tokenizer = load_tokenizer(source)
    if template is None and source.run is not None:
        return tokenizer, template_from_dict(source.run["template"], tokenizer)
    return tokenizer, load_template(template or "auto", tokenizer)


def load_for_inference(source: ModelSource, dtype: str = "float32", head: str | None = None
                       ) -> tuple[torch.nn.Module, torch.device]:
    """The model of ``source`` on the best device, in eval mode (a QLoRA run's base quantized as in training)."""
    device = pick_device()
    model = load_model(source, dtype, device=device, head=head)
    if source.quantization is None:  # a quantized model was placed on the device while loading
        model = model.to(device)
    return model.eval(), device


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


@dataclass
class Generator:
    """A model, its tokenizer and template, ready to answer."""

    model: torch.nn.Module
    tokenizer: object
    template: Template
    device: torch.device

    @classmethod
    def load(cls, spec: str, template: str | None = None, dtype: str = "float32") -> "Generator":
        """``spec`` is anything a model argument accepts; a run directory brings its own template, and a QLoRA run
        its quantized base (loaded the way it was trained, so generation matches training)."""
        source = resolve_model(spec)
        tokenizer, chosen = tokenizer_and_template(source, template)
        model, device = load_for_inference(source, dtype)
        return cls(model, tokenizer, chosen, device)

    def stop_ids(self) -> list[int]:
        return stop_ids(self.tokenizer, self.template)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of a prompt with the assistant header appended, tokenised segment by segment exactly as in
        training."""
        return encode_prompt(_as_conversation(messages), self.template, self.tokenizer)[0]

    def generate(self, conversations: list[list[Message]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        """Answer the last user turn of each conversation. Greedy when ``temperature`` is 0.

        Prompts are tokenised segment by segment exactly as in training, then left-padded into batches.
        """
        return [g.text for g in self.generate_responses(conversations, max_new_tokens, temperature, top_p,
                                                        batch_size)]

    @torch.no_grad()
    def generate_responses(self, conversations: list[list[Message]], max_new_tokens: int = 64,
                           temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list["Generation"]:
        """:meth:`generate` with more than the text: whether each response stopped by itself (see
        :class:`Generation`) and its token count, in the order of ``conversations``."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        pad = self.tokenizer.pad_token_id
        stops = self.stop_ids()
        outputs: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            input_ids, attention = left_pad(prompts[start:start + batch_size], pad)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
                {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            generated = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                            max_new_tokens=max_new_tokens, eos_token_id=stops,
                                            pad_token_id=pad, **sampling)
            responses = generated[:, input_ids.shape[1]:]
            mask, stopped = response_mask(responses, stops)
            for row, length, stop in zip(responses.tolist(), mask.sum(dim=1).tolist(), stopped.tolist()):
                # The text before the first stop token (the mask keeps the stop token itself).
                ids = row[:length - 1] if stop else row[:length]
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                outputs.append(Generation(text, stop, len(ids)))
        return outputs


@dataclass(frozen=True)
class Generation:
    """One generated response.

    Attributes:
        text: the decoded response, cut before its first stop token, special tokens dropped, stripped.
        stopped: True when the model produced a stop token (EOS or the template's end of turn) within
            ``max_new_tokens``: it answered and stopped, rather than continuing the text up to the limit.
        num_tokens: generated tokens before the stop token (the limit when it did not stop).
    """

    text: str
    stopped: bool
    num_tokens: int


def _as_conversation(messages: list[Message]) -> Conversation:
    return Conversation(list(messages))

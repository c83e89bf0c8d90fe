"""Load a model or run for generation, and generate with the same template as training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import Template, load_template, template_from_dict
from tuneforge.data.tokenize import encode_text
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
        ids: list[int] = []
        for segment in self.template.segments(_as_conversation(messages), add_generation_prompt=True):
            ids += encode_text(self.tokenizer, segment.text)
        return ids

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
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention[i, width - len(ids):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
                {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            generated = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                            max_new_tokens=max_new_tokens, eos_token_id=stops,
                                            pad_token_id=pad, **sampling)
            for row in generated[:, width:].tolist():
                outputs.append(self._generation(row, stops))
        return outputs

    def _generation(self, ids: list[int], stops: list[int]) -> "Generation":
        """The text before the first stop token; ``ids`` are untrimmed (a finished row is padded after its stop
        token, often with EOS itself, so only the first stop counts)."""
        stop_set = set(stops)
        end = next((i for i, token in enumerate(ids) if token in stop_set), None)
        if end is not None:
            ids = ids[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Generation(text, end is not None, len(ids))


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

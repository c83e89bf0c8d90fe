"""Load a model or run for generation, and generate with the same template as training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import Template, load_template, template_from_dict
from tuneforge.data.tokenize import encode_prompt
from tuneforge.engine.step import pick_device
from tuneforge.models.loading import ModelSource, load_model, load_tokenizer, resolve_model
from tuneforge.progress import progress as show_progress


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
                           temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                           progress: str | None = None) -> list["Generation"]:
        """:meth:`generate` with more than the text: whether each response stopped by itself (see
        :class:`Generation`) and its token count, in the order of ``conversations``. With ``progress``, the
        batches done are shown under that name (``tuneforge.progress``)."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        pad = self.tokenizer.pad_token_id
        stops = self.stop_ids()
        outputs: list[Generation] = []
        starts = range(0, len(prompts), batch_size)
        for start in show_progress(starts, progress or "", enabled=None if progress else False):
            input_ids, attention = left_pad(prompts[start:start + batch_size], pad)
            generated = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                            max_new_tokens=max_new_tokens, eos_token_id=stops,
                                            pad_token_id=pad, **_sampling(temperature, top_p))
            responses = generated[:, input_ids.shape[1]:]
            mask, stopped = response_mask(responses, stops)
            for row, length, stop in zip(responses.tolist(), mask.sum(dim=1).tolist(), stopped.tolist()):
                # The text before the first stop token (the mask keeps the stop token itself).
                ids = row[:length - 1] if stop else row[:length]
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                outputs.append(Generation(text, stop, len(ids)))
        return outputs

    @torch.no_grad()
    def stream(self, messages: list[Message], on_text: Callable[[str], None], max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0,
               should_stop: Callable[[], bool] | None = None) -> "Generation":
        """Answer one conversation like :meth:`generate_responses`, passing the text to ``on_text`` piece by piece
        as it is generated. The pieces joined are the returned ``Generation.text`` (at temperature 0, the answer
        :meth:`generate` gives): the same prompt, stop tokens and decoding, leading and trailing whitespace
        dropped.

        ``should_stop`` is asked after every token (from a signal handler's flag, say); when it answers True the
        generation ends there and the text so far is returned (``stopped`` False: no stop token was produced).
        """
        stops = self.stop_ids()
        streamer = _TextStreamer(self.tokenizer, stops, on_text)
        criteria = StoppingCriteriaList([_AskToStop(should_stop)]) if should_stop is not None else None
        input_ids = torch.tensor([self.prompt_ids(messages)], dtype=torch.long, device=self.device)
        self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id,
                            streamer=streamer, stopping_criteria=criteria, **_sampling(temperature, top_p))
        streamer.end()  # generate() ends it too, except when it was interrupted
        return Generation(streamer.text(), streamer.stopped, len(streamer.ids))


def _sampling(temperature: float, top_p: float) -> dict:
    """``generate`` arguments: sampling at ``temperature`` with nucleus ``top_p``, greedy at 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class _TextStreamer(BaseStreamer):
    """Receives the ids ``generate`` produces (the prompt first, then one token per step, batch of one) and
    passes on the new text of the response decoded so far, as the non-streaming path decodes it: ids up to the
    first stop token, special tokens dropped, stripped. Text that may still change is held back: trailing
    whitespace (it would be stripped if the answer ended there) and an incomplete UTF-8 character."""

    def __init__(self, tokenizer, stops: Sequence[int], on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, set(stops), on_text
        self.ids: list[int] = []
        self.shown = ""
        self.seen_prompt = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():  # generation reads every token back anyway: no extra sync
            if self.stopped:
                return
            if token in self.stops:
                self.stopped = True
                return
            self.ids.append(token)
        text = self.text().rstrip()
        if not text.endswith("\ufffd"):
            self._show(text)

    def end(self) -> None:
        self._show(self.text())

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


class _AskToStop(StoppingCriteria):
    """Ends generation when ``should_stop()`` says so (checked once per generated token)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool,
                          device=input_ids.device)


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

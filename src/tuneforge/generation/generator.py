"""A model with its tokenizer and template, answering conversations as it was trained to (``tuneforge generate``,
``chat``, ``eval``, ``eval.generation_data`` during training): prompts tokenised exactly as in training, sampled
through :class:`tuneforge.generation.engine.HFEngine`, decoded up to the first stop token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteriaList

from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import Template, load_template, template_from_dict
from tuneforge.data.tokenize import encode_prompt
from tuneforge.engine.step import pick_device
from tuneforge.generation.engine import HFEngine, SamplingSettings, stop_ids
from tuneforge.generation.streaming import AskToStop, TextStreamer
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


@dataclass
class Generator:
    """A model, its tokenizer and template, ready to answer. The model is used as it is (its adapter on); it is
    put in eval mode while generating and back in its mode after. Sampling (``temperature`` > 0) draws from
    torch's global generator."""

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

    def engine(self, bf16: bool = False) -> HFEngine:
        """The token-level engine on this model (``bf16``: generate under bf16 autocast)."""
        return HFEngine(self.model, self.tokenizer.pad_token_id, self.stop_ids(), self.device, bf16)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of a prompt with the assistant header appended, tokenised segment by segment exactly as in
        training."""
        return encode_prompt(Conversation(list(messages)), self.template, self.tokenizer)[0]

    def decode(self, ids: Sequence[int], stops: Sequence[int] | None = None) -> Generation:
        """The :class:`Generation` of one response's ids as an engine returns them (up to and including the first
        stop token, one of ``stops``, default :meth:`stop_ids`)."""
        stops = self.stop_ids() if stops is None else stops
        stopped = bool(ids) and ids[-1] in stops
        kept = list(ids[:-1] if stopped else ids)
        return Generation(self.tokenizer.decode(kept, skip_special_tokens=True).strip(), stopped, len(kept))

    def generate(self, conversations: list[list[Message]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        """Answer the last user turn of each conversation. Greedy when ``temperature`` is 0.

        Prompts are tokenised segment by segment exactly as in training, then left-padded into batches.
        """
        return [g.text for g in self.generate_responses(conversations, max_new_tokens, temperature, top_p,
                                                        batch_size)]

    def generate_responses(self, conversations: list[list[Message]], max_new_tokens: int = 64,
                           temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                           progress: str | None = None) -> list[Generation]:
        """:meth:`generate` with more than the text: whether each response stopped by itself (see
        :class:`Generation`) and its token count, in the order of ``conversations``. With ``progress``, the
        batches done are shown under that name (``tuneforge.progress``)."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        settings = SamplingSettings.from_temperature(max_new_tokens, temperature, top_p)
        engine = self.engine()
        outputs: list[Generation] = []
        starts = range(0, len(prompts), batch_size)
        for start in show_progress(starts, progress or "", enabled=None if progress else False):
            outputs += [self.decode(ids, engine.stop_ids)
                        for ids in engine.generate(prompts[start:start + batch_size], settings)]
        return outputs

    def stream(self, messages: list[Message], on_text: Callable[[str], None], max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0,
               should_stop: Callable[[], bool] | None = None) -> Generation:
        """Answer one conversation like :meth:`generate_responses`, passing the text to ``on_text`` piece by piece
        as it is generated. The pieces joined are the returned ``Generation.text`` (at temperature 0, the answer
        :meth:`generate` gives): the same prompt, stop tokens and decoding, leading and trailing whitespace
        dropped.

        ``should_stop`` is asked after every token (from a signal handler's flag, say); when it answers True the
        generation ends there and the text so far is returned (``stopped`` False: no stop token was produced).
        """
        engine = self.engine()
        streamer = TextStreamer(self.tokenizer, engine.stop_ids, on_text)
        criteria = StoppingCriteriaList([AskToStop(should_stop)]) if should_stop is not None else None
        engine.generate([self.prompt_ids(messages)], SamplingSettings.from_temperature(max_new_tokens, temperature,
                                                                                       top_p),
                        streamer=streamer, stopping_criteria=criteria)
        streamer.end()  # generate() ends it too, except when it was interrupted
        return Generation(streamer.text(), streamer.stopped, len(streamer.ids))

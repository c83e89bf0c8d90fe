"""Text as it is generated (``tuneforge chat``): a streamer that shows what the finished answer will read, and a
stopping criterion that ends an answer on request (Ctrl-C)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class TextStreamer(BaseStreamer):
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


class AskToStop(StoppingCriteria):
    """Ends generation when ``should_stop()`` says so (checked once per generated token)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool,
                          device=input_ids.device)

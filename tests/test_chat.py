"""Streaming generation and ``tuneforge chat``: streamed text equals the non-streaming answer, a stop request ends
an answer, and the chat streams, confirms /reset and goes on after Ctrl-C."""

from __future__ import annotations

import itertools
import signal

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.data.formats import Message
from tuneforge.data.templates import load_template
from tuneforge.generation import Generator
from tuneforge.generation.streaming import TextStreamer

from conftest import build_tiny_model

PROMPTS = ["hello", "What is item 3?", "Tell me a story", "abc"]


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory, tokenizer):
    """A tiny model whose untied output head has large random weights, so greedy answers are varied real text
    (the plain tiny model answers whitespace and special tokens, which decode to nothing)."""
    model = build_tiny_model(tokenizer, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("chatty")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def generator(chatty_dir):
    return Generator.load(str(chatty_dir))


def test_streamed_text_is_the_answer_at_temperature_0(generator):
    for prompt in PROMPTS:
        messages = [Message("system", "Be brief."), Message("user", prompt)]
        pieces: list[str] = []
        streamed = generator.stream(messages, pieces.append, max_new_tokens=24)
        expected = generator.generate_responses([messages], max_new_tokens=24)[0]
        assert len(pieces) > 1  # it did stream
        assert "".join(pieces) == streamed.text == expected.text
        assert streamed == expected


def test_the_streamer_cuts_at_the_stop_token_and_never_shows_half_a_character(tokenizer):
    template = load_template("auto", tokenizer)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = "Hi 🦜 there, naïve"  # the parrot is three byte tokens
    ids = tokenizer(" " + answer + "  ", add_special_tokens=False)["input_ids"]
    after = tokenizer(" not shown", add_special_tokens=False)["input_ids"]
    assert stop in Generator(None, tokenizer, template, torch.device("cpu")).stop_ids()
    pieces: list[str] = []
    streamer = TextStreamer(tokenizer, [stop], pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() passes first
    for token in ids + [stop] + after:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == streamer.text() == answer
    assert streamer.stopped and streamer.ids == ids
    assert not any("\ufffd" in piece for piece in pieces)
    assert not pieces[0].startswith(" ")


def test_a_stop_request_ends_the_answer_where_it_is(generator):
    messages = [Message("user", "hello")]
    calls = itertools.count(1)
    pieces: list[str] = []
    result = generator.stream(messages, pieces.append, max_new_tokens=24, should_stop=lambda: next(calls) >= 3)
    assert result.num_tokens == 3 and not result.stopped
    assert "".join(pieces) == result.text == generator.generate([messages], max_new_tokens=3)[0]


def test_chat_streams_confirms_reset_and_goes_on_after_ctrl_c(chatty_dir, generator, monkeypatch, capsys):
    replies = iter(["hello", "What is item 3?", "/reset", "abc", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    seen: list[list[str]] = []
    real_stream = Generator.stream

    def stream(self, messages, *args, **kwargs):
        seen.append([m.role for m in messages])
        return real_stream(self, messages, *args, **kwargs)

    monkeypatch.setattr(Generator, "stream", stream)
    # Ctrl-C during the third forward pass of the first answer, as a user would press it.
    from transformers import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward
    forwards = itertools.count(1)

    def forward(self, *args, **kwargs):
        if next(forwards) == 3:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                raise AssertionError("Ctrl-C here would leave the chat")
            signal.raise_signal(signal.SIGINT)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    assert cli_main(["chat", str(chatty_dir), "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    answers = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert len(answers) == 3
    interrupted = [Message("user", "hello")]
    assert answers[0] == generator.generate([interrupted], max_new_tokens=3)[0]  # three tokens, then stopped
    assert "[stopped" in err and err.count("[stopped") == 1
    assert "history cleared" in err
    # The partial answer stayed in the history; /reset emptied it.
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert answers[2] == generator.generate([[Message("user", "abc")]], max_new_tokens=12)[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

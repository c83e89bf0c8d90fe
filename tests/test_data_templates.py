"""Golden token masks, one per template: the exact rendered text and the exact trained spans of a fixed
two-turn conversation with a system prompt.

What is trained for an assistant turn is its content plus the end-of-turn token that closes it; headers, prompts
and the separator after the end-of-turn token are not. SmolLM2's pad token equals its EOS token, so these tests
also pin that padding never masks the real EOS (masks come from segments, not from token ids).
"""

from __future__ import annotations

import pytest

from tuneforge.data.formats import Conversation, Message, to_conversation
from tuneforge.data.templates import load_template
from tuneforge.data.tokenize import encode_conversation, encode_text
from tuneforge.losses import IGNORE_INDEX

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Question one?", "Answer one.", "Question two?", "Answer two."
CONTEXT = "Context one."
EOS = "<|im_end|>"
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# A small template of our own, in the shape of a tokenizer chat template; it closes each answer with eos_token.
CUSTOM_JINJA = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def two_turns(*, system: bool = True, context: str | None = None) -> Conversation:
    messages = [Message("system", SYSTEM)] if system else []
    messages += [Message("user", Q1, context), Message("assistant", A1), Message("user", Q2),
                 Message("assistant", A2)]
    return Conversation(messages, source="golden.jsonl", row=1)


# case -> (template spec, conversation kwargs, exact rendered text, exact trained spans, separator after EOS)
GOLDEN = {
    "alpaca": (
        "alpaca", {},
        "Be brief.\n\n"
        "### Instruction:\nQuestion one?\n\n### Response:\nAnswer one.<|im_end|>\n\n"
        "### Instruction:\nQuestion two?\n\n### Response:\nAnswer two.<|im_end|>\n\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n\n"),
    "alpaca_with_input": (
        "alpaca", {"context": CONTEXT},
        "Be brief.\n\n"
        "### Instruction:\nQuestion one?\n\n### Input:\nContext one.\n\n### Response:\nAnswer one.<|im_end|>\n\n"
        "### Instruction:\nQuestion two?\n\n### Response:\nAnswer two.<|im_end|>\n\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n\n"),
    "chatml": (
        "chatml", {},
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQuestion one?<|im_end|>\n<|im_start|>assistant\nAnswer one.<|im_end|>\n"
        "<|im_start|>user\nQuestion two?<|im_end|>\n<|im_start|>assistant\nAnswer two.<|im_end|>\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n"),
    "simple": (
        "simple", {},
        "Be brief.\n\nUser: Question one?\nAssistant: Answer one.<|im_end|>\n"
        "User: Question two?\nAssistant: Answer two.<|im_end|>\n",
        # The space after "Assistant:" is the model's to write, so it is trained with the answer.
        [" Answer one.<|im_end|>", " Answer two.<|im_end|>"], "\n"),
    "tokenizer": (
        "tokenizer", {},
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQuestion one?<|im_end|>\n<|im_start|>assistant\nAnswer one.<|im_end|>\n"
        "<|im_start|>user\nQuestion two?<|im_end|>\n<|im_start|>assistant\nAnswer two.<|im_end|>\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n"),
    "tokenizer_default_system": (
        "tokenizer", {"system": False},
        f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nQuestion one?<|im_end|>\n<|im_start|>assistant\nAnswer one.<|im_end|>\n"
        "<|im_start|>user\nQuestion two?<|im_end|>\n<|im_start|>assistant\nAnswer two.<|im_end|>\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n"),
    "custom_jinja": (
        "CUSTOM", {},
        "### system:\nBe brief.\n"
        "### user:\nQuestion one?\n### assistant:\nAnswer one.<|im_end|>\n"
        "### user:\nQuestion two?\n### assistant:\nAnswer two.<|im_end|>\n",
        ["Answer one.<|im_end|>", "Answer two.<|im_end|>"], "\n"),
}


@pytest.fixture
def custom_template_path(tmp_path):
    path = tmp_path / "custom.jinja"
    path.write_text(CUSTOM_JINJA)
    return path


def _template(spec, tokenizer, custom_template_path):
    return load_template(str(custom_template_path) if spec == "CUSTOM" else spec, tokenizer)


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_render_and_trained_spans(case, tokenizer, custom_template_path, trained_spans):
    spec, kwargs, rendered, spans, _ = GOLDEN[case]
    template = _template(spec, tokenizer, custom_template_path)
    conversation = two_turns(**kwargs)

    assert "".join(s.text for s in template.segments(conversation)) == rendered
    example = encode_conversation(conversation, template, tokenizer, max_length=1024)
    assert tokenizer.decode(example.input_ids) == rendered
    assert trained_spans(example) == spans
    assert len(example.labels) == len(example.input_ids)
    # Labels are aligned with ids: a trained label is the token's own id.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
    assert not example.truncated and example.responses_lost == 0


@pytest.mark.parametrize("case", list(GOLDEN))
def test_each_response_closes_with_trained_eos_and_untrained_separator(case, tokenizer, custom_template_path):
    spec, kwargs, _, spans, separator = GOLDEN[case]
    # The tokenizer pads with its EOS id; masks must still keep the real EOS that ends each response.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    example = encode_conversation(two_turns(**kwargs), _template(spec, tokenizer, custom_template_path), tokenizer,
                                  max_length=1024)
    ends = [i for i in range(len(example.labels))
            if example.labels[i] != IGNORE_INDEX and (i + 1 == len(example.labels)
                                                      or example.labels[i + 1] == IGNORE_INDEX)]
    assert len(ends) == len(spans) == 2
    for end in ends:
        assert example.input_ids[end] == tokenizer.eos_token_id
        assert example.labels[end] == tokenizer.eos_token_id
        # The separator after the end-of-turn token is the template's, not the model's: untrained.
        assert end + 1 < len(example.input_ids)
        assert example.labels[end + 1] == IGNORE_INDEX
        # Tokenised with the untrained text that follows it (as a whole-text tokenisation does), alpaca's "\n\n"
        # before "###" is two tokens, so compare text, not one token.
        assert tokenizer.decode(example.input_ids[end + 1:]).startswith(separator)
    # Exactly the two closing EOS tokens are trained (a system or user <|im_end|> never is).
    trained_eos = [i for i, (t, l) in enumerate(zip(example.input_ids, example.labels))
                   if t == tokenizer.eos_token_id and l != IGNORE_INDEX]
    assert trained_eos == ends


@pytest.mark.parametrize("case", list(GOLDEN))
def test_train_on_prompt_trains_every_token(case, tokenizer, custom_template_path):
    spec, kwargs, rendered, _, _ = GOLDEN[case]
    example = encode_conversation(two_turns(**kwargs), _template(spec, tokenizer, custom_template_path), tokenizer,
                                  max_length=1024, train_on_prompt=True)
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == rendered


@pytest.mark.parametrize("case", list(GOLDEN))
def test_generation_prompt_is_the_training_prefix(case, tokenizer, custom_template_path):
    """What the model sees at inference before answering turn 2 is token for token what it saw in training."""
    spec, kwargs, _, _, _ = GOLDEN[case]
    template = _template(spec, tokenizer, custom_template_path)
    conversation = two_turns(**kwargs)
    example = encode_conversation(conversation, template, tokenizer, max_length=1024)
    first_trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    second_start = next(i for i in first_trained if example.labels[i - 1] == IGNORE_INDEX and i > first_trained[0])

    prompt = Conversation(conversation.messages[:-1])
    ids = [t for s in template.segments(prompt, add_generation_prompt=True) for t in encode_text(tokenizer, s.text)]
    assert ids == example.input_ids[:second_start]
    assert template.prompt_text(conversation.messages[:-1]) == tokenizer.decode(ids)


def test_chatml_and_smollm2_tokenizer_template_give_identical_examples(tokenizer):
    chatml = encode_conversation(two_turns(), load_template("chatml", tokenizer), tokenizer, max_length=1024)
    own = encode_conversation(two_turns(), load_template("tokenizer", tokenizer), tokenizer, max_length=1024)
    assert (chatml.input_ids, chatml.labels) == (own.input_ids, own.labels)


def test_auto_template_is_the_tokenizers_own(tokenizer):
    assert load_template("auto", tokenizer).name == "tokenizer"


@pytest.mark.parametrize("row, rendered, spans", [
    ({"instruction": "Name a colour.", "output": "Red."},
     "Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\nName a colour.\n\n### Response:\nRed.<|im_end|>\n\n",
     ["Red.<|im_end|>"]),
    ({"instruction": "Translate.", "input": "chat", "output": "cat"},
     "Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request."
     "\n\n### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\ncat<|im_end|>\n\n",
     ["cat<|im_end|>"]),
], ids=["without_input", "with_input"])
def test_alpaca_rows_get_the_original_preamble(row, rendered, spans, tokenizer, trained_spans):
    conversation = to_conversation(row, "auto", "a.jsonl", 1)
    example = encode_conversation(conversation, load_template("alpaca", tokenizer), tokenizer, max_length=1024)
    assert tokenizer.decode(example.input_ids) == rendered
    assert trained_spans(example) == spans


@pytest.mark.parametrize("spec", ["chatml", "tokenizer", "alpaca", "simple"])
def test_prompt_completion_trains_only_the_completion(spec, tokenizer, trained_spans):
    row = {"prompt": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                      {"role": "user", "content": Q2}],
           "completion": [{"role": "assistant", "content": A2}]}
    conversation = to_conversation(row, "auto", "pc.jsonl", 1)
    example = encode_conversation(conversation, load_template(spec, tokenizer), tokenizer, max_length=1024)
    prefix = " " if spec == "simple" else ""
    assert trained_spans(example) == [f"{prefix}{A2}{EOS}"]
    assert A1 in tokenizer.decode(example.input_ids)  # the earlier answer is still shown as context


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer):
    conversation = to_conversation({"text": "Plain words to learn."}, "auto", "t.jsonl", 1)
    assert conversation.is_plain_text
    example = encode_conversation(conversation, load_template("chatml", tokenizer), tokenizer, max_length=1024)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids) == "Plain words to learn.<|im_end|>"
    assert example.num_trained == len(example.input_ids) - 1


def test_plain_text_ignores_system_prompt(tokenizer):
    conversation = to_conversation({"text": "Just text."}, "auto", "t.jsonl", 1, system_prompt="Be nice.")
    example = encode_conversation(conversation, load_template("chatml", tokenizer), tokenizer, max_length=1024)
    assert tokenizer.decode(example.input_ids) == "Just text.<|im_end|>"


def test_plain_text_already_ending_with_eos_gets_one_eos(tokenizer):
    conversation = to_conversation({"text": "Done.<|im_end|>"}, "auto", "t.jsonl", 1)
    example = encode_conversation(conversation, load_template("chatml", tokenizer), tokenizer, max_length=1024)
    assert tokenizer.decode(example.input_ids) == "Done.<|im_end|>"


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer_dir):
    """SmolLM2's tokenizer set to start plain text with BOS, as Llama-style tokenizers do."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)


@pytest.mark.parametrize("spec", ["alpaca", "chatml", "simple"])
def test_builtin_templates_start_with_bos_when_the_tokenizer_adds_one(spec, tokenizer, bos_tokenizer):
    plain = encode_conversation(two_turns(), load_template(spec, tokenizer), tokenizer, max_length=1024)
    with_bos = encode_conversation(two_turns(), load_template(spec, bos_tokenizer), bos_tokenizer, max_length=1024)
    assert with_bos.input_ids == [bos_tokenizer.bos_token_id] + plain.input_ids
    assert with_bos.labels == [IGNORE_INDEX] + plain.labels
    # Generation sees the same BOS-first prefix.
    prompt = two_turns().messages[:2]
    assert load_template(spec, bos_tokenizer).prompt_text(prompt) == (
        bos_tokenizer.bos_token + load_template(spec, tokenizer).prompt_text(prompt))

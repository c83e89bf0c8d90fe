"""A merged model, an exported GGUF and a run's own tokenizer carry the template the run was trained with, as a chat
template that renders a conversation into exactly the token ids training used.

The reference is the training path itself: the recipe's template and tokenizer through ``encode_conversation``
(training) and ``encode_prompt`` (generation). Served models go through the tokenizer's ``apply_chat_template``:
the whole conversation rendered as one text and tokenised at once.
"""

from __future__ import annotations

import pytest

from tuneforge.config import config_from_dict
from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import JinjaTemplate, load_template
from tuneforge.data.tokenize import encode_conversation, encode_prompt
from tuneforge.errors import TemplateError
from tuneforge.models.export import export_gguf
from tuneforge.models.merge import merge_run, training_chat_template
from tuneforge.engine.trainer import Trainer

from conftest import QA_ROWS, write_jsonl

# In the shape of a tokenizer chat template; closes each answer with eos_token.
CUSTOM_JINJA = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
# The classic mistake: the header ends in a space, so training tokenises "Ġ" + "Red" where the whole text has
# "ĠRed". No chat template can give the training ids back.
SPACE_HEADER_JINJA = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
SPECS = ("chatml", "alpaca", "simple", "tokenizer", "custom")
TWO_TURNS = [Message("system", "You answer in one word."), Message("user", "What colour is the sky?"),
             Message("assistant", "Blue."), Message("user", "And grass, at 12:00?"), Message("assistant", "Green.")]


def _spec(name: str, root) -> str:
    if name in ("custom", "space_header"):
        path = root / f"{name}.jinja"
        path.write_text(CUSTOM_JINJA if name == "custom" else SPACE_HEADER_JINJA)
        return str(path)
    return name


def _train(root, model_dir, template: str) -> Trainer:
    values = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(write_jsonl(root / "qa.jsonl", QA_ROWS[:4])), "max_length": 64, "template": template},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "train": {"output_dir": str(root / "run"), "max_steps": 1, "batch_size": 4, "seed": 0},
    }
    recipe = Trainer(config_from_dict(values), log=lambda m: None, show_progress=False)
    recipe.setup()
    recipe.train()
    recipe.save()
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """runs(spec) -> (training recipe, run dir, merged folder) of a one-step LoRA run with that template, cached."""
    made = {}

    def run(spec: str):
        if spec not in made:
            root = tmp_path_factory.mktemp(f"run-{spec}")
            recipe = _train(root, tiny_model_dir, _spec(spec, root))
            made[spec] = recipe, root / "run", merge_run(root / "run", root / "merged")
        return made[spec]

    return run


def _training_ids(recipe, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    if add_generation_prompt:
        return encode_prompt(Conversation(messages), recipe.template, recipe.tokenizer)[0]
    return encode_conversation(Conversation(messages), recipe.template, recipe.tokenizer, max_length=4096).input_ids


def _served_ids(folder, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(dicts, tokenize=True, return_dict=False,
                                         add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages, add_generation_prompt", [
    (TWO_TURNS, False),
    (TWO_TURNS[:-1], True),
    (TWO_TURNS[1:], False),
    (TWO_TURNS[1:2], True),
], ids=["two_turns", "prompt", "no_system", "first_prompt"])
@pytest.mark.parametrize("spec", SPECS)
def test_merged_tokenizer_renders_the_training_ids(runs, spec, messages, add_generation_prompt):
    recipe, run_dir, merged_dir = runs(spec)
    expected = _training_ids(recipe, messages, add_generation_prompt)
    assert _served_ids(merged_dir, messages, add_generation_prompt) == expected
    # PEFT users load the run's own tokenizer folder: the same template.
    assert _served_ids(run_dir / "tokenizer", messages, add_generation_prompt) == expected


def test_gguf_carries_the_merged_chat_template(runs):
    """Export writes what merge writes (one function makes both); reading a GGUF back parses every token, so once."""
    import gguf
    from transformers import AutoTokenizer

    _, run_dir, merged_dir = runs("alpaca")
    gguf_file = export_gguf(run_dir, merged_dir.parent / "run.gguf", dtype="f16")
    field = gguf.GGUFReader(str(gguf_file)).fields["tokenizer.chat_template"]
    assert field.contents() == AutoTokenizer.from_pretrained(merged_dir).chat_template


@pytest.mark.parametrize("spec", SPECS)
def test_builtin_templates_replace_the_base_chat_template(runs, spec, tokenizer):
    from transformers import AutoTokenizer

    recipe, _, merged_dir = runs(spec)
    written = AutoTokenizer.from_pretrained(merged_dir).chat_template
    if recipe.template.name == "tokenizer":
        assert written == tokenizer.chat_template
    else:
        assert written != tokenizer.chat_template


@pytest.mark.parametrize("spec", SPECS)
def test_training_on_the_merged_model_masks_as_the_run_did(runs, spec):
    """``tuneforge generate`` or a new run on the merged folder (data.template auto) uses its chat template: the
    same ids and the same trained tokens as the run itself."""
    from transformers import AutoTokenizer

    recipe, _, merged_dir = runs(spec)
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    again = encode_conversation(Conversation(TWO_TURNS), load_template("auto", merged_tokenizer), merged_tokenizer,
                                max_length=4096)
    trained = encode_conversation(Conversation(TWO_TURNS), recipe.template, recipe.tokenizer, max_length=4096)
    assert (again.input_ids, again.labels) == (trained.input_ids, trained.labels)


def test_a_template_without_system_prompts_is_checked_without_them(tokenizer):
    jinja = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             + CUSTOM_JINJA)
    assert training_chat_template(JinjaTemplate(tokenizer, "no-system.jinja", jinja), tokenizer) == jinja


def test_alpaca_input_and_a_bos_token_are_reproduced(tokenizer):
    """The ``### Input:`` section and its preamble, and a BOS token at the start (Llama-style tokenizers)."""
    template = load_template("alpaca", tokenizer).bind(tokenizer.eos_token, tokenizer.bos_token)
    jinja = training_chat_template(template, tokenizer)
    messages = [Message("user", "Translate.", context="chien"), Message("assistant", "dog")]
    expected = encode_conversation(Conversation(messages), template, tokenizer, max_length=4096).input_ids
    assert expected[0] == tokenizer.bos_token_id
    assert tokenizer.apply_chat_template(template.chat_messages(messages), chat_template=jinja, tokenize=True,
                                         return_dict=False) == expected
    assert "paired with an input" in tokenizer.decode(expected)


def test_a_template_no_chat_template_can_reproduce_is_refused(tmp_path, tiny_model_dir, tokenizer):
    recipe = _train(tmp_path, tiny_model_dir, _spec("space_header", tmp_path))
    with pytest.raises(TemplateError, match="no chat template reproduces"):
        training_chat_template(recipe.template, recipe.tokenizer)
    with pytest.raises(TemplateError, match="no chat template reproduces"):
        merge_run(tmp_path / "run", tmp_path / "merged")
    with pytest.raises(TemplateError, match="no chat template reproduces"):
        export_gguf(tmp_path / "run", tmp_path / "run.gguf")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run.gguf").exists()
    # The finished run is kept, its tokenizer with the base's own chat template (and a warning).
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer").chat_template == tokenizer.chat_template

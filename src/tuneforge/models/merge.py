"""Merge a LoRA run into its base model and save a plain Hugging Face checkpoint; give a run's tokenizer the
chat template the run was trained with.

A served model (transformers, vLLM, llama.cpp, Ollama) is prompted through its tokenizer's chat template: the
whole conversation rendered as one text, then tokenised. Training tokenised a template's segments one by one
(``data.tokenize``). :func:`training_chat_template` writes the run's template as Jinja and checks, on probe
conversations, that the two give the same token ids, so a merged or exported model is prompted exactly as it was
trained, or the merge refuses.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tuneforge.data.formats import Conversation, Message
from tuneforge.data.templates import Template, template_from_dict
from tuneforge.data.tokenize import encode_conversation, encode_prompt
from tuneforge.errors import TemplateError, UserError
from tuneforge.models.card import write_merged_card
from tuneforge.models.loading import ModelSource, load_model, load_tokenizer, resolve_model

# Conversations that take every branch of a template: with and without a system prompt (alpaca's preamble, a
# tokenizer's default system prompt), an alpaca input, a multi-line answer, numbers and punctuation.
PROBE_CONVERSATIONS = (
    (Message("system", "Be brief."), Message("user", "Name a colour."), Message("assistant", "Red."),
     Message("user", "And a number?"), Message("assistant", "Seven, or 7.")),
    (Message("user", "Translate the word.", context="chat"), Message("assistant", "cat\n(French to English)"),
     Message("user", "Is it a noun?"), Message("assistant", "Yes: a common noun.")),
)
# Tokens of context shown either side of the first differing token in a refusal.
DIFF_CONTEXT = 4


def training_chat_template(template: Template, tokenizer) -> str:
    """``template`` as a Hugging Face chat template (Jinja) that renders a conversation into the token ids training
    gave it (``encode_conversation``), and with ``add_generation_prompt`` into the prompt generation gives
    (``encode_prompt``), as checked on :data:`PROBE_CONVERSATIONS`. Raises a :class:`TemplateError` naming the
    first differing token where no chat template can do that with this tokenizer."""
    jinja = template.chat_template()
    checked = 0
    for messages in PROBE_CONVERSATIONS:
        try:
            full = encode_conversation(Conversation(list(messages)), template, tokenizer, max_length=sys.maxsize)
            prompt, _ = encode_prompt(Conversation(list(messages[:-1])), template, tokenizer)
        except TemplateError:
            continue  # training refuses this conversation too (a template without system prompts, say)
        for expected, shown, generation in ((full.input_ids, messages, False), (prompt, messages[:-1], True)):
            rendered = _chat_ids(tokenizer, jinja, template.chat_messages(list(shown)), generation, template.name)
            if rendered != expected:
                raise TemplateError(_mismatch(template.name, tokenizer, expected, rendered))
        checked += 1
    if not checked:
        raise TemplateError(f"template {template.name} renders none of the probe conversations (user and assistant "
                            "turns, with and without a system prompt), so its chat template cannot be checked")
    return jinja


def _chat_ids(tokenizer, jinja: str, messages: list[dict], add_generation_prompt: bool, name: str) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))
    except Exception as error:  # jinja raises its own exception types
        raise TemplateError(f"the chat template written for template {name} fails to render: {error}") from None


def _mismatch(name: str, tokenizer, expected: list[int], rendered: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, rendered)) if a != b), min(len(expected), len(rendered)))
    window = slice(max(0, at - DIFF_CONTEXT), at + DIFF_CONTEXT)
    return (f"template {name}: no chat template reproduces the token ids this run was trained on with this "
            f"tokenizer (from token {at}, training has {tokenizer.convert_ids_to_tokens(expected[window])}, the whole "
            f"rendered text tokenises to {tokenizer.convert_ids_to_tokens(rendered[window])}), so a model served with "
            "it would be prompted differently from training. Use the run itself (tuneforge generate / chat), or "
            "train with data.template chatml or tokenizer")


def run_chat_template(source: ModelSource, tokenizer) -> str:
    """The chat template of the template ``source`` (a run) was trained with; see :func:`training_chat_template`."""
    return training_chat_template(template_from_dict(source.run["template"], tokenizer), tokenizer)


def save_tokenizer(tokenizer, folder: Path, template: Template) -> None:
    """Save ``tokenizer`` into ``folder`` with ``template`` as its chat template (so PEFT and transformers users of
    a run directory prompt it as it was trained), leaving the tokenizer object as it was. Where the template cannot
    be reproduced exactly, the tokenizer's own chat template is saved and a warning says why: a finished run is
    never lost to this."""
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = training_chat_template(template, tokenizer)
    except TemplateError as error:
        logging.getLogger("tuneforge").warning("%s keeps the base tokenizer's chat template: %s", folder, error)
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = original


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Load base + adapter, fold W + (alpha/r)·BA into W, save weights and tokenizer (loads with transformers
    alone). The tokenizer's chat template is the run's training template (:func:`training_chat_template`); a
    template that cannot be reproduced exactly is refused before anything is written. Refuses to write into an
    existing non-empty folder. A model card (README.md, ``models.card``) describes the run and the merge.

    A QLoRA run (base trained in 4 or 8 bits) is merged into the *float* base in ``dtype``: the adapter learned
    to correct the quantized weights, so the merged model is close to, not exactly, what was trained. Merging
    into the quantized weights instead would round the update away.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new output folder")
    source = resolve_model(str(run_dir))
    if source.adapter is None:
        raise UserError(f"{run_dir} is not a LoRA run directory (nothing to merge)")
    tokenizer = load_tokenizer(source)
    tokenizer.chat_template = run_chat_template(source, tokenizer)
    if source.quantization is not None:
        logging.getLogger("tuneforge").warning(
            "%s was trained on a %s base; merging into the dequantised (original %s) base, so the merged model is not "
            "exactly the quantized model the adapter was trained on", run_dir, source.quantization.describe(), dtype)
    model = load_model(source, dtype, quantize=False)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_merged_card(run_dir, out_dir)  # README.md: a new folder, so no card of the user's is there
    return out_dir

"""What a run's weights are good for outside tuneforge: the PEFT adapter, the full model, the merged model, and
generation with left padding."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.data.formats import Message
from tuneforge.data.templates import load_template
from tuneforge.errors import UserError
from tuneforge.generation import Generator
from tuneforge.models.loading import load_model, resolve_model
from tuneforge.models.merge import merge_run
from tuneforge.engine.trainer import Trainer

from conftest import QA_ROWS, build_tiny_model, write_jsonl

# fp32 tolerance between two computations of the same function (merged vs adapter, batched vs alone).
LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)


def _train(tmp_path_factory, model_dir, name: str, **sections) -> Trainer:
    root = tmp_path_factory.mktemp(name)
    values = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(write_jsonl(root / "qa.jsonl", QA_ROWS)), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # A high rate, so the adapter moves far from its zero start and merged vs unmerged is a real check.
        "train": {"output_dir": str(root / "run"), "max_steps": 3, "batch_size": 4, "lr": 5e-2, "seed": 0,
                  "warmup_steps": 0, "scheduler": "constant"},
    }
    for section, updates in sections.items():
        values[section].update(updates)
    recipe = Trainer(config_from_dict(values), log=lambda m: None, show_progress=False)
    recipe.setup()
    recipe.train()
    recipe.save()
    recipe.model.eval()
    return recipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir) -> Trainer:
    return _train(tmp_path_factory, tiny_model_dir, "lora-run")


@pytest.fixture(scope="module")
def probe(tokenizer) -> dict:
    text = "<|im_start|>user\nWhat is item 3?<|im_end|>\n<|im_start|>assistant\nItem 3 is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model, probe) -> torch.Tensor:
    return model(**probe).logits.float()


def test_lora_adapter_loads_with_plain_peft(lora_run, tiny_model_dir, probe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = lora_run.run_dir / "adapter"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    ours = load_model(resolve_model(str(lora_run.run_dir))).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    trained = _logits(lora_run.model, probe)
    torch.testing.assert_close(_logits(plain, probe), trained, **LOGIT_TOL)
    torch.testing.assert_close(_logits(ours, probe), trained, **LOGIT_TOL)
    # The adapter is not a no-op.
    assert (_logits(base, probe) - trained).abs().max() > 1e-2


def test_merged_model_matches_the_adapter_and_loads_with_transformers(lora_run, tmp_path, probe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = lora_run.model.state_dict()
    assert any("lora_B" in k and state[k].abs().max() > 0 for k in state), "B must be non-zero to test merging"

    out = merge_run(lora_run.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, probe), _logits(lora_run.model, probe), **LOGIT_TOL)
    assert AutoTokenizer.from_pretrained(out).chat_template

    # An existing non-empty output folder is refused and left alone.
    with pytest.raises(UserError, match="not empty"):
        merge_run(lora_run.run_dir, out)
    assert merged.config.to_dict() == AutoModelForCausalLM.from_pretrained(out).config.to_dict()


def test_merge_refuses_a_full_fine_tuning_run(tmp_path_factory, tiny_model_dir, tmp_path):
    full = _train(tmp_path_factory, tiny_model_dir, "full-run", lora={"enabled": False}, train={"max_steps": 1})
    with pytest.raises(UserError, match="not a LoRA run"):
        merge_run(full.run_dir, tmp_path / "merged")


def test_full_fine_tuning_saves_a_transformers_model(tmp_path_factory, tiny_model_dir, probe):
    from transformers import AutoModelForCausalLM

    full = _train(tmp_path_factory, tiny_model_dir, "full-model", lora={"enabled": False}, train={"max_steps": 2})
    assert not (full.run_dir / "adapter").exists()
    loaded = AutoModelForCausalLM.from_pretrained(full.run_dir / "model").eval()
    trained = _logits(full.model, probe)
    torch.testing.assert_close(_logits(loaded, probe), trained, **LOGIT_TOL)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (_logits(base, probe) - trained).abs().max() > 1e-2


def test_generator_loads_a_run_with_its_template(lora_run):
    generator = Generator.load(str(lora_run.run_dir))
    assert generator.template.to_dict() == lora_run.template.to_dict()
    assert generator.tokenizer.convert_tokens_to_ids("<|im_end|>") in generator.stop_ids()
    (answer,) = generator.generate([[Message("user", "What is item 3?")]], max_new_tokens=4)
    assert isinstance(answer, str)


# ------------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def generator(tokenizer) -> Generator:
    # A larger init than the default 0.02 gives decisive logits, so greedy choices are far from ties and a
    # batched/alone difference can only come from the padding.
    model = build_tiny_model(tokenizer, seed=3, initializer_range=0.2).eval()
    return Generator(model, tokenizer, load_template("auto", tokenizer), torch.device("cpu"))


def test_left_padded_batch_generates_what_each_prompt_generates_alone(generator, monkeypatch):
    # Never stop early: compare all 8 tokens.
    monkeypatch.setattr(Generator, "stop_ids", lambda self: [])
    conversations = [[Message("user", "Hi")],
                     [Message("user", "Please describe, in a few careful words, the colour of the sea at dawn.")]]
    lengths = [len(generator.tokenizer(generator.template.prompt_text(c))["input_ids"]) for c in conversations]
    assert lengths[1] > lengths[0] + 5, "the batch needs real left padding"

    # Record the ids and the logits of every generated step: greedy ids alone are robust to small errors, the
    # logits show any leak from the padding.
    recorded = {}
    real_generate = generator.model.generate

    def recording_generate(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        width = kwargs["input_ids"].shape[1]
        recorded.setdefault(kwargs["input_ids"].shape[0], []).append(
            (out.sequences[:, width:], torch.stack(out.logits, dim=1)))
        return out.sequences

    monkeypatch.setattr(generator.model, "generate", recording_generate)
    together = generator.generate(conversations, max_new_tokens=8)
    alone = [generator.generate([c], max_new_tokens=8)[0] for c in conversations]
    assert together == alone
    (batched_ids, batched_logits), = recorded[2]
    alone_ids = torch.cat([ids for ids, _ in recorded[1]])
    alone_logits = torch.cat([logits for _, logits in recorded[1]])
    assert batched_ids.shape == (2, 8)
    assert torch.equal(batched_ids, alone_ids)
    torch.testing.assert_close(batched_logits, alone_logits, **LOGIT_TOL)
    assert not torch.equal(alone_ids[0], alone_ids[1])  # two different continuations, not a degenerate model

"""GGUF export: the file transformers reads back computes the same logits and tokenizes the same way."""

from __future__ import annotations

import warnings

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.errors import USER_ERROR_EXIT_CODE, UserError
from tuneforge.models.export import export_gguf, permute_rotary
from tuneforge.models.loading import load_model, resolve_model

from conftest import build_tiny_model

# f32 export stores the same numbers, so only the order of float ops differs.
F32_TOL = dict(rtol=1e-4, atol=1e-4)
# f16 rounds every weight to ~3 significant digits; the tiny model's logits are O(0.1).
F16_TOL = dict(rtol=2e-2, atol=2e-2)
PROBE_IDS = [[1, 504, 3458, 314, 2543, 30, 28, 2, 9690, 17]]
SENTENCE = "Hello world! It's 2024; naïve café — <|im_start|>user\nhi<|im_end|>"


def _from_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(PROBE_IDS)).logits.float()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def f32_export(tiny_model_dir, tmp_path_factory):
    return export_gguf(str(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", dtype="f32")


def test_permute_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = torch.randn(4 * 8, 16).numpy()
    for n_head, n_kv in ((4, 4), (8, 4)):
        back = LlamaTensorProcessor()._reverse_permute_weights(permute_rotary(weights, n_head, n_kv), n_head, n_kv)
        assert (back == weights).all()
        assert not (permute_rotary(weights, n_head, n_kv) == weights).all()


def test_f32_export_matches_hf_logits(f32_export, hf_model):
    model, _ = _from_gguf(f32_export)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model), _logits(hf_model), **F32_TOL)


def test_f16_export_is_close(tiny_model_dir, hf_model, f32_export, tmp_path):
    out = export_gguf(str(tiny_model_dir), tmp_path / "tiny-f16.gguf")
    assert out.stat().st_size < 0.7 * f32_export.stat().st_size
    model, _ = _from_gguf(out)
    torch.testing.assert_close(_logits(model), _logits(hf_model), **F16_TOL)


def test_untied_output_is_written(tokenizer, tmp_path, hf_model):
    model = build_tiny_model(tokenizer, seed=1, tie_word_embeddings=False).eval()
    model.save_pretrained(tmp_path / "untied")
    tokenizer.save_pretrained(tmp_path / "untied")
    out = export_gguf(str(tmp_path / "untied"), tmp_path / "untied.gguf", dtype="f32")
    loaded, _ = _from_gguf(out)
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(_logits(loaded), _logits(model), **F32_TOL)


def test_tokenizer_and_chat_template_round_trip(f32_export, tokenizer):
    _, loaded = _from_gguf(f32_export)
    assert loaded(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    messages = [{"role": "user", "content": "What is item 3?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_cli_export_refuses_an_existing_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "taken.gguf"
    out.write_text("mine")
    code = cli_main(["export", str(tiny_model_dir), "--format", "gguf", str(out), "--dtype", "f32"])
    assert code == USER_ERROR_EXIT_CODE
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_cli_export_writes_a_file(tiny_model_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    assert cli_main(["export", str(tiny_model_dir), "--format", "gguf", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "cli.gguf.partial").exists()


def test_refuses_an_unsupported_architecture(tmp_path, tokenizer):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    tokenizer.save_pretrained(tmp_path / "phi3")
    with pytest.raises(UserError, match="'phi3' model; GGUF export supports llama, mistral, qwen2, qwen3 models"):
        export_gguf(str(tmp_path / "phi3"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_lora_run_exports_the_merged_model(make_config, qa_file, tmp_path, hf_model):
    from tuneforge.engine.trainer import run_training

    summary = run_training(make_config(qa_file, train={"max_steps": 2, "lr": 1e-2}), log=lambda m: None)
    run_dir = summary["run_dir"]
    adapted = load_model(resolve_model(run_dir)).eval()
    out = export_gguf(run_dir, tmp_path / "merged.gguf", dtype="f32")
    loaded, _ = _from_gguf(out)
    torch.testing.assert_close(_logits(loaded), _logits(adapted), **F32_TOL)
    # The adapter moved the model, so this checks the merge and not just the base.
    assert (_logits(hf_model) - _logits(adapted)).abs().max() > 1e-3

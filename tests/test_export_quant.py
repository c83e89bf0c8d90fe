"""GGUF export across architectures (Llama, Mistral, Qwen2, Qwen3) and storage types (f32, f16, q8_0, q4_0).

Each tiny model is built from its architecture's config with fixed-seed random weights (norms and biases random
too, so a dropped or misplaced vector shows), exported, read back by transformers' GGUF loader and compared on
logits twice: exactly against the original model with every matrix rounded through the same GGML type (the file
holds what we meant to write, in the layout the reader expects), and loosely against the original model (what the
storage type costs; tolerances below were measured, then given headroom).

The tokenizer is a 300-token byte-level BPE trained here, not SmolLM2's: with 49k tokens transformers' GGUF reader
spends ~25 s per file parsing the vocabulary, and the tokenizer round trip is tested in test_export.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tuneforge.errors import UserError
from tuneforge.models.export import export_gguf, tensor_type

# One size for all, chosen so every matrix row (64 or 128 wide, 512 for Qwen3's o_proj) splits into 32-weight blocks.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-5)
# Per architecture: config class name and what differs from TINY. Mistral is untied (as Mistral-7B), so its q4_0
# file has a separate `output` matrix; the others tie the embedding as the small Qwen and SmolLM models do. Qwen3
# keeps head_dim 128 (every released Qwen3's): transformers' reader ignores attention.key_length for qwen3 and
# assumes 128, so another head_dim exports fine for llama.cpp but cannot be read back here.
ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=4096)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=128, rope_theta=1e6)),
}
PROBE_IDS = [[1, 200, 45, 301, 17, 99, 2, 250, 8, 64]]

# The file against the original model rounded through the same types: only the order of float ops differs.
SAME_WEIGHTS_TOL = dict(rtol=1e-4, atol=1e-4)
# The file against the original model: max |logit error|, for logits of 0.6 to 1.3 (weights of std 0.02). Measured,
# largest over the four architectures: f32 0, f16 3.4e-4, q8_0 8.4e-3, q4_0 1.5e-1 (the same-weights error was 0
# for every type); the bounds give 2-3x headroom. Q8_0 keeps 8 bits per weight and one f16 scale per 32 weights,
# ~25x f16's rounding; Q4_0 keeps 4 bits, ~16x coarser again.
ORIGINAL_TOL = {"f32": 1e-4, "f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.3}
DTYPES = tuple(ORIGINAL_TOL)


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE (GPT-2 splitting, as SmolLM2's) with 307 tokens, trained on one sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["Hello world! It's 2024; the quick brown fox jumps over the lazy dog."] * 20,
                                trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def build_model(arch: str, tokenizer, seed: int = 0, **overrides):
    import transformers

    config_name, extra = ARCH_CONFIGS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # HF initialises norms to 1 and biases to 0; a lost one would not change a logit
                param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.02 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, small_tokenizer):
    """arch -> (folder holding the saved tiny model, the model). Built on first use, once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            # Not named "mistral": transformers maps a llama file whose general.name is exactly that to a
            # `mistral` tensor map gguf-py does not have, and fails to load it.
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = build_model(arch, small_tokenizer)
            model.save_pretrained(folder)
            small_tokenizer.save_pretrained(folder)
            cache[arch] = folder, model
        return cache[arch]

    return get


def read_back(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(PROBE_IDS)).logits.float()


def stored_types(path) -> dict[str, str]:
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}


@torch.no_grad()
def rounded_copy(model, dtype: str, types: dict[str, str]):
    """``model`` with every matrix rounded as the file stores it (``types``: GGUF tensor name -> GGML type)."""
    import copy

    import gguf
    from gguf.quants import dequantize, quantize

    by_hf_name = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    rounded = copy.deepcopy(model)
    for name, param in rounded.named_parameters():
        if param.ndim < 2:
            continue
        if name.startswith("model.layers."):
            layer, suffix = name.split(".")[2], ".".join(name.split(".")[3:])
            gguf_name = f"blk.{layer}.{_LAYER_NAMES[suffix]}"
        else:
            gguf_name = by_hf_name[name]
        kind = types[gguf_name]
        array = param.numpy()
        if kind == "F16":
            array = array.astype(np.float16).astype(np.float32)
        elif kind != "F32":
            qtype = gguf.GGMLQuantizationType[kind]
            array = dequantize(quantize(array, qtype), qtype)
        param.copy_(torch.from_numpy(np.ascontiguousarray(array)))
    return rounded


_LAYER_NAMES = {f"self_attn.{p}_proj.weight": f"attn_{g}.weight"
                for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))}
_LAYER_NAMES.update({f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", tuple(ARCH_CONFIGS))
def test_export_reads_back_with_close_logits(arch, dtype, saved_models, tmp_path):
    folder, model = saved_models(arch)
    out = export_gguf(str(folder), tmp_path / f"{arch}-{dtype}.gguf", dtype=dtype)
    types = stored_types(out)
    tied = ARCH_CONFIGS[arch][1]["tie_word_embeddings"]
    assert ("output.weight" in types) == (not tied)
    matrices = {name: kind for name, kind in types.items() if not name.endswith(("norm.weight", ".bias"))}
    vectors = {name: kind for name, kind in types.items() if name not in matrices}
    assert set(vectors.values()) == {"F32"}
    if arch == "qwen2":
        assert "blk.1.attn_k.bias" in vectors
    if arch == "qwen3":
        assert "blk.1.attn_q_norm.weight" in vectors and "blk.1.attn_k_norm.weight" in vectors
    output = "token_embd.weight" if tied else "output.weight"
    # A q4_0 file keeps the output projection at q8_0 (llama.cpp: Q6_K); everything else is the asked type.
    assert matrices.pop(output) == ("Q8_0" if dtype == "q4_0" else dtype.upper())
    assert set(matrices.values()) == {dtype.upper()}

    loaded = read_back(out)
    got = logits(loaded)
    torch.testing.assert_close(got, logits(rounded_copy(model, dtype, types)), **SAME_WEIGHTS_TOL)
    error = (got - logits(model)).abs().max().item()
    assert error <= ORIGINAL_TOL[dtype], f"{arch} {dtype}: max |logit error| {error:.2e}"


def test_quantized_files_are_smaller(saved_models, tmp_path):
    folder, _ = saved_models("mistral")
    sizes = {dtype: export_gguf(str(folder), tmp_path / f"{dtype}.gguf", dtype=dtype).stat().st_size
             for dtype in DTYPES}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_rows_that_do_not_fill_blocks_fall_back_to_f16(small_tokenizer, tmp_path):
    model = build_model("llama", small_tokenizer, intermediate_size=80)  # down_proj rows: 80 = 2.5 blocks of 32
    model.save_pretrained(tmp_path / "odd")
    small_tokenizer.save_pretrained(tmp_path / "odd")
    out = export_gguf(str(tmp_path / "odd"), tmp_path / "odd.gguf", dtype="q4_0")
    types = stored_types(out)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 80), "q8_0", tied=True) == "F16"
    got = logits(read_back(out))
    torch.testing.assert_close(got, logits(rounded_copy(model, "q4_0", types)), **SAME_WEIGHTS_TOL)


def test_refuses_an_unsupported_dtype(tmp_path):
    # gguf's numpy quantizer has no K-quants (Q4_K and friends only dequantize), so q4_k_m is not offered.
    with pytest.raises(UserError, match="f32, f16, q8_0, q4_0, not 'q4_k_m'"):
        export_gguf(str(tmp_path), tmp_path / "k.gguf", dtype="q4_k_m")


def test_refuses_sliding_window_layers(small_tokenizer, tmp_path):
    model = build_model("qwen2", small_tokenizer, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    model.save_pretrained(tmp_path / "swa")
    small_tokenizer.save_pretrained(tmp_path / "swa")
    with pytest.raises(UserError, match="sliding-window"):
        export_gguf(str(tmp_path / "swa"), tmp_path / "swa.gguf")
    assert not (tmp_path / "swa.gguf").exists()


def test_refuses_qwen3_attention_bias(small_tokenizer, tmp_path):
    model = build_model("qwen3", small_tokenizer, attention_bias=True)
    model.save_pretrained(tmp_path / "biased")
    small_tokenizer.save_pretrained(tmp_path / "biased")
    with pytest.raises(UserError, match="k_proj.bias"):
        export_gguf(str(tmp_path / "biased"), tmp_path / "biased.gguf")


def _retokenized(tokenizer, pre_tokenizer):
    import copy

    changed = copy.deepcopy(tokenizer)
    changed.backend_tokenizer.pre_tokenizer = pre_tokenizer
    return changed


@pytest.mark.parametrize("split", ["qwen2", "llama-bpe"])
def test_split_regex_is_named_for_llama_cpp(split, small_tokenizer, tmp_path):
    """Qwen2's and Llama 3's tokenizers split text with a regex; the file names it so readers split the same."""
    import gguf
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tuneforge.models.export import LLAMA3_SPLIT

    regex = PRETOKENIZE_REGEX if split == "qwen2" else LLAMA3_SPLIT
    tokenizer = _retokenized(small_tokenizer, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    # A Llama model: transformers gives a qwen2 folder Qwen2Tokenizer, which sets Qwen2's splitter whatever is saved.
    model = build_model("llama", tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", dtype="q8_0")
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = "It's 2024 and 12345 DOGS jump!"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    # The splitter matters on this text: GPT-2's regex would give other ids, so a wrong name would show.
    assert tokenizer(text)["input_ids"] != small_tokenizer(text)["input_ids"]


def test_refuses_a_sentencepiece_style_tokenizer(small_tokenizer, tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _retokenized(small_tokenizer, pre_tokenizers.Metaspace())
    build_model("llama", tokenizer).save_pretrained(tmp_path / "sp")
    tokenizer.save_pretrained(tmp_path / "sp")
    with pytest.raises(UserError, match="byte-level BPE"):
        export_gguf(str(tmp_path / "sp"), tmp_path / "sp.gguf")


def test_cli_exports_a_quantized_file(saved_models, tmp_path, capsys):
    from tuneforge.cli import main as cli_main

    folder, _ = saved_models("qwen2")
    out = tmp_path / "cli-q4.gguf"
    assert cli_main(["export", str(folder), "--format", "gguf", str(out), "--dtype", "q4_0"]) == 0
    assert "q4_0" in capsys.readouterr().out
    assert stored_types(out)["blk.0.ffn_up.weight"] == "Q4_0"

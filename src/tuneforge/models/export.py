"""Export a model or a run to a single GGUF file (weights, tokenizer and chat template) for llama.cpp and friends.

Llama, Mistral, Qwen2 (Qwen2.5) and Qwen3 models with a byte-level BPE tokenizer are written, as f32, f16 or the
block-quantized Q8_0 and Q4_0 (the types ``gguf``'s numpy quantizer implements; its K-quants dequantize only). The
layout follows llama.cpp's ``convert_hf_to_gguf.py``, so the file loads there and in transformers
(``from_pretrained(folder, gguf_file=name)``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import UserError
from tuneforge.models.card import write_gguf_card
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model
from tuneforge.models.merge import run_chat_template

# --dtype -> (GGML type of the weight matrices, llama.cpp's file type), as names in ``gguf`` (imported lazily).
EXPORT_DTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# llama-quantize keeps the output projection (the embedding when tied) at Q6_K in a Q4 file: it decides every
# logit. gguf's numpy quantizer has no Q6_K, so a q4_0 file keeps it at Q8_0, the nearest type it can write.
OUTPUT_TYPE = {"q4_0": "Q8_0"}
# A matrix whose rows do not split into whole blocks is stored as f16 instead, as convert_hf_to_gguf does.
FALLBACK_TYPE = "F16"

# Per-layer HF parameter suffix -> GGUF tensor name (``blk.N.`` is prefixed).
LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp writes one Hugging Face ``model_type``.

    ``permute_qk``: llama.cpp's ``llama`` rope rotates adjacent pairs, so q and k rows are reordered
    (``permute_rotary``); ``qwen2``/``qwen3`` use NEOX rope, which pairs dimensions as HF does, so they are not.
    ``extra_tensors``: per-layer tensors beyond ``LAYER_TENSORS`` (Qwen2's q/k/v biases, Qwen3's q/k norms).
    """

    name: str
    permute_qk: bool
    extra_tensors: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llama": GGUFArch("llama", permute_qk=True),
    # convert_hf_to_gguf writes Mistral as `llama` too (same graph); llama.cpp's llama attends to the whole context.
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False, extra_tensors={
        f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"}),
    "qwen3": GGUFArch("qwen3", permute_qk=False, extra_tensors={
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}),
}

# How a byte-level BPE tokenizer splits text before merging, by llama.cpp's name (``tokenizer.ggml.pre``): the
# regex of a ``Split`` pre-tokenizer (Llama 3's, and Qwen2's as transformers' Qwen2Tokenizer writes it).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def export_gguf(model_spec: str | Path, out_file: str | Path, dtype: str = "f16") -> Path:
    """Write ``model_spec`` (a HF folder, a .gguf file, a hub id or a tuneforge run directory) to ``out_file``.

    A LoRA run is merged into its base first (a QLoRA run into the float base, as ``tuneforge merge`` does), and a
    run's chat template is the one it was trained with (``merge.training_chat_template``; refused where no chat
    template reproduces the training tokens); a folder, file or hub id keeps its own.
    ``dtype`` is the storage type of the weight matrices: ``f32`` (exact), ``f16``, or the 32-weight block types
    ``q8_0`` and ``q4_0`` (a q4_0 file keeps the output projection at q8_0, see ``OUTPUT_TYPE``); norm vectors and
    biases stay f32 as in llama.cpp. Refuses an existing ``out_file`` and an architecture not in ``ARCHITECTURES``.
    The model card goes to README.md beside the file when that folder has none, else to NAME.gguf.README.md
    (``card.gguf_card_path``); an existing file is never overwritten.
    """
    out_file = Path(out_file)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"GGUF export dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    if out_file.exists():
        raise UserError(f"{out_file} exists; choose a new output file (export never overwrites)")
    if not out_file.parent.is_dir():
        raise UserError(f"folder {out_file.parent} does not exist")
    source = resolve_model(str(model_spec))
    tokenizer = load_tokenizer(source)
    if source.run is not None:
        # A run is prompted as it was trained (checked before the model loads); a plain folder keeps its own.
        tokenizer.chat_template = run_chat_template(source, tokenizer)
    model = load_model(source, "float32", quantize=False)
    if source.adapter:
        model = model.merge_and_unload()
    arch = _check_supported(model, tokenizer, model_spec)

    import gguf

    # Write next to the target and rename at the end, so a failed export leaves no half-written file behind.
    partial = out_file.with_name(out_file.name + ".partial")
    try:
        writer = gguf.GGUFWriter(str(partial), arch.name)
        _add_model_metadata(writer, model.config, dtype, name=Path(str(model_spec)).name)
        _add_tokenizer_metadata(writer, tokenizer, model.config.vocab_size)
        _add_tensors(writer, model, arch, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if out_file.exists():
            raise UserError(f"{out_file} appeared while exporting; not overwriting it")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    write_gguf_card(str(model_spec), out_file, dtype)  # README.md beside it, or NAME.gguf.README.md: never over a file
    return out_file


def _check_supported(model, tokenizer, model_spec) -> GGUFArch:
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"{model_spec} is a {config.model_type!r} model; GGUF export supports "
                        f"{', '.join(ARCHITECTURES)} models")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise UserError(f"{model_spec} uses sliding-window attention in some layers; GGUF export writes full "
                        "attention only (set use_sliding_window=false if the model was trained that way)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model_spec} uses rope scaling {rope.get('rope_type')!r}; GGUF export supports plain "
                        "rotary embeddings only")
    unwritten = sorted(set(model.state_dict()) - set(_tensor_plan(config, arch)) - {"lm_head.weight"})
    if unwritten or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"{model_spec} has bias terms or other tensors a {config.model_type} GGUF does not hold "
                        f"({', '.join(unwritten[:3]) or 'attention_bias/mlp_bias'}); GGUF export does not write them")
    if (not getattr(tokenizer, "is_fast", False) or _tokenizer_model(tokenizer)["type"] != "BPE"
            or _tokenizer_model(tokenizer).get("byte_fallback") or _pre_tokenizer_name(tokenizer) is None):
        raise UserError(f"{model_spec} does not have a byte-level BPE tokenizer splitting text as GPT-2, Llama 3 or "
                        "Qwen2 do (a SentencePiece-style tokenizer, say); GGUF export writes only those")
    return arch


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_model_metadata(writer, config, dtype: str, name: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_file_type(getattr(gguf.LlamaFileType, EXPORT_DTYPES[dtype][1]))


def _tokenizer_model(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def _pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``), or None for a splitter we
    cannot name (exporting it under a wrong name would make llama.cpp tokenize differently, silently).

    SmolLM2 splits every digit, then applies GPT-2's regex: llama.cpp calls that ``smollm``. Plain GPT-2 splitting
    is ``gpt2``; a ``Split`` on Llama 3's regex is ``llama-bpe``, on Qwen2's ``qwen2``. llama.cpp picks this by
    hashing the tokenizer's output; we read the splitter itself instead.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [part.get("type") for part in parts]
    if "ByteLevel" not in kinds:
        return None
    splits = [part.get("pattern", {}).get("Regex") for part in parts if part.get("type") == "Split"]
    if not splits:
        if any(part.get("type") == "Digits" and part.get("individual_digits") for part in parts):
            return "smollm"
        return "gpt2" if set(kinds) <= {"ByteLevel"} else None
    named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
    return named.get(splits[0]) if len(parts) == 2 and len(splits) == 1 else None


def _add_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """Tokens in the byte-level spelling (``Ġthe``), their types, the merges, special ids and the chat template."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            # The embedding has more rows than the tokenizer has tokens (padded for speed); llama.cpp names them so.
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in _tokenizer_model(tokenizer)["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's reordering of a q or k projection (``convert_hf_to_gguf.py``'s ``permute``).

    HF's rotary embedding pairs dimension i with i + head_dim/2 (rotate_half); llama.cpp pairs 2i with 2i+1. This
    interleaves the two halves of every head's rows so llama.cpp's rope computes the same thing.
    weights: (n_head * head_dim, hidden) -> same shape, rows reordered within each head.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_plan(config, arch: GGUFArch) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, in llama.cpp's order."""
    plan = {"model.embed_tokens.weight": "token_embd.weight"}
    for layer in range(config.num_hidden_layers):
        for suffix, gguf_name in {**LAYER_TENSORS, **arch.extra_tensors}.items():
            plan[f"model.layers.{layer}.{suffix}"] = f"blk.{layer}.{gguf_name}"
    plan["model.norm.weight"] = "output_norm.weight"
    if not getattr(config, "tie_word_embeddings", False):
        # llama.cpp omits `output` when it is the embedding matrix; readers then tie it back (transformers does).
        plan["lm_head.weight"] = "output.weight"
    return plan


def tensor_type(gguf_name: str, shape: tuple[int, ...], dtype: str, tied: bool) -> str:
    """The GGML type (a ``gguf.GGMLQuantizationType`` name) a tensor of ``shape`` (rows, row length) is stored in.

    Vectors (norms, biases) stay F32, as llama.cpp writes them: they are tiny and every output depends on them.
    A block type needs rows of whole blocks (32 weights for Q8_0 and Q4_0); other matrices fall back to F16.
    """
    import gguf

    if len(shape) < 2:
        return "F32"
    is_output = gguf_name == ("token_embd.weight" if tied else "output.weight")
    name = OUTPUT_TYPE.get(dtype, EXPORT_DTYPES[dtype][0]) if is_output else EXPORT_DTYPES[dtype][0]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]
    return name if shape[-1] % block == 0 else FALLBACK_TYPE


def _add_tensors(writer, model, arch: GGUFArch, dtype: str) -> None:
    import gguf
    from gguf.quants import quantize

    config = model.config
    state = {name: tensor.detach().to(torch.float32).cpu().numpy() for name, tensor in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, gguf_name in _tensor_plan(config, arch).items():
        array = state[hf_name]
        if arch.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            n_kv = config.num_key_value_heads if gguf_name.endswith("attn_k.weight") else config.num_attention_heads
            array = permute_rotary(array, config.num_attention_heads, n_kv)
        kind = tensor_type(gguf_name, array.shape, dtype, tied)
        if kind == "F32":
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        elif kind == "F16":
            writer.add_tensor(gguf_name, np.ascontiguousarray(array.astype(np.float16)))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)

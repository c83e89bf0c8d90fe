"""Export a model or a run to a single GGUF file (weights, tokenizer and chat template) for llama.cpp and friends.

Only the Llama architecture with a byte-level BPE (GPT-2 style) tokenizer is written, which covers SmolLM2 and the
tiny test models. The layout follows llama.cpp's ``convert_hf_to_gguf.py``, so the file loads there and in
transformers (``from_pretrained(folder, gguf_file=name)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import UserError
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model
from tuneforge.models.merge import run_chat_template

GGUF_ARCH = "llama"
EXPORT_DTYPES = ("f32", "f16")

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


def export_gguf(model_spec: str | Path, out_file: str | Path, dtype: str = "f16") -> Path:
    """Write ``model_spec`` (a HF folder, a .gguf file, a hub id or a tuneforge run directory) to ``out_file``.

    A LoRA run is merged into its base first (a QLoRA run into the float base, as ``tuneforge merge`` does), and a
    run's chat template is the one it was trained with (``merge.training_chat_template``; refused where no chat
    template reproduces the training tokens); a folder, file or hub id keeps its own.
    ``dtype`` is the storage type of the matrices: ``f32`` (exact) or ``f16``; norm vectors stay f32 as in
    llama.cpp. Refuses an existing ``out_file`` and any architecture other than Llama.
    """
    out_file = Path(out_file)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
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
    _check_supported(model.config, tokenizer, model_spec)

    import gguf

    # Write next to the target and rename at the end, so a failed export leaves no half-written file behind.
    partial = out_file.with_name(out_file.name + ".partial")
    try:
        writer = gguf.GGUFWriter(str(partial), GGUF_ARCH)
        _add_model_metadata(writer, model.config, dtype, name=Path(str(model_spec)).name)
        _add_tokenizer_metadata(writer, tokenizer, model.config.vocab_size)
        _add_tensors(writer, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if out_file.exists():
            raise UserError(f"{out_file} appeared while exporting; not overwriting it")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


def _check_supported(config, tokenizer, model_spec) -> None:
    if config.model_type != "llama":
        raise UserError(f"{model_spec} is a {config.model_type!r} model; GGUF export supports Llama models only")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model_spec} uses rope scaling {rope.get('rope_type')!r}; GGUF export supports plain "
                        "rotary embeddings only")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"{model_spec} has bias terms in attention or MLP; GGUF export does not write them")
    if not getattr(tokenizer, "is_fast", False) or _tokenizer_model(tokenizer)["type"] != "BPE":
        raise UserError(f"{model_spec} does not have a byte-level BPE tokenizer; GGUF export supports only those")


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
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _tokenizer_model(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def _pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``).

    SmolLM2 splits every digit, then applies GPT-2's regex: llama.cpp calls that ``smollm``. Plain GPT-2 splitting
    is ``gpt2``. llama.cpp picks this by hashing the tokenizer's output; we read the splitter itself instead.
    """
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    if any(part.get("type") == "Digits" and part.get("individual_digits") for part in parts):
        return "smollm"
    return "gpt2"


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


def _add_tensors(writer, model, dtype: str) -> None:
    config = model.config
    state = {name: tensor.detach().to(torch.float32).cpu().numpy() for name, tensor in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def add(name: str, array: np.ndarray) -> None:
        # Vectors (norms) stay f32, as llama.cpp writes them: f16 saves nothing there and costs precision.
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(name, np.ascontiguousarray(array))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for suffix, gguf_name in LAYER_TENSORS.items():
            array = state[f"model.layers.{layer}.{suffix}"]
            if gguf_name == "attn_q.weight":
                array = permute_rotary(array, config.num_attention_heads, config.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                array = permute_rotary(array, config.num_attention_heads, config.num_key_value_heads)
            add(f"blk.{layer}.{gguf_name}", array)
    add("output_norm.weight", state["model.norm.weight"])
    if not tied:
        # llama.cpp omits `output` when it is the embedding matrix; readers then tie it back (transformers does).
        add("output.weight", state["lm_head.weight"])

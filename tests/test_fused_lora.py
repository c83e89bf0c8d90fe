"""The fused LoRA path (models/fused_lora.py): the same numbers as PEFT's LoRA (forward and every gradient, with
and without dropout, under bf16 autocast, over a 4-bit base), mask replay under activation checkpointing, PEFT's
semantics where it falls back, a standard adapter on disk, the same training run, and less saved for backward."""

from __future__ import annotations

import warnings

import pytest
import torch

from tuneforge.engine.metrics import read_metrics
from tuneforge.engine.trainer import Trainer, run_training
from tuneforge.models import dropout as dropout_module
from tuneforge.models import fused_lora
from tuneforge.models.dropout import use_fast_dropout
from tuneforge.models.fused_lora import FusedLora, fuse_lora, unfuse_lora

# hidden 64, intermediate 128, 2 layers (conftest.TINY) with a small vocabulary: fast, and every path is there.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
IDS = torch.arange(7, 7 + 2 * 24).reshape(2, 24) * 5 % 512


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def with_lora(model, dropout: float = 0.0, **options):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                 target_modules="all-linear", **options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at 0, which would hide B's part of the output and every A gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def forward_backward(model, ids=IDS):
    """(logits, {name: grad} for every trainable parameter plus ``inputs_embeds``) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits.float().pow(2).mean() + logits.float()[..., :7].sum() * 1e-3).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = embeds.grad.clone()
    return logits.detach(), grads


def assert_relatively_close(got, want, tol, what=""):
    error = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert error <= tol * max(scale, 1e-12), f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def assert_same_run(got, want, tol=1e-5):
    (logits, grads), (ref_logits, ref_grads) = got, want
    assert_relatively_close(logits, ref_logits, tol, "logits")
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name in ref_grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        assert_relatively_close(grads[name], ref_grads[name], tol, name)


def fused_members(model) -> int:
    return sum(isinstance(m.__dict__.get("forward"), fused_lora._Member) for m in model.modules())


# ------------------------------------------------------------------------------------------------ fp32 parity
def test_fp32_parity_with_peft_at_dropout_zero():
    model = with_lora(tiny_llama())
    reference = forward_backward(model)
    assert fuse_lora(model) == (14, 8)  # per layer: q/k/v, o, gate/up, down
    assert fused_members(model) == 14
    calls = []
    real = FusedLora.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedLora, "apply", lambda *a: calls.append(len(a)) or real(*a))
        got = forward_backward(model)
    assert len(calls) == 8  # one fused call per group, not one per projection
    assert_same_run(got, reference)
    assert unfuse_lora(model) == 14 and fused_members(model) == 0
    assert_same_run(forward_backward(model), reference, tol=0)


def test_rslora_fuses_with_its_scaling():
    model = with_lora(tiny_llama(), use_rslora=True)
    reference = forward_backward(model)
    fuse_lora(model)
    assert_same_run(forward_backward(model), reference)


def fixed_masks(monkeypatch):
    """Make every CPU keep-mask a fixed function of its shape, on PEFT's FastDropout and on the fused path alike,
    so both sides drop the same elements; returns the list of shapes drawn."""
    drawn = []

    def mask(shape, p):
        drawn.append(tuple(shape))
        generator = torch.Generator().manual_seed(sum(shape) * 7 + len(shape))
        return torch.rand(shape, generator=generator) >= p

    monkeypatch.setattr(dropout_module, "keep_mask", mask)
    monkeypatch.setattr(fused_lora, "keep_mask", mask)
    return drawn


def test_parity_with_peft_under_dropout_with_the_same_masks(monkeypatch):
    drawn = fixed_masks(monkeypatch)
    model = with_lora(tiny_llama(), dropout=0.3)
    use_fast_dropout(model)
    reference = forward_backward(model)
    assert len(drawn) == 14
    drawn.clear()
    fuse_lora(model)
    got = forward_backward(model)
    assert len(drawn) == 8  # one mask per group
    assert_same_run(got, reference)
    # ... and the masks matter: without dropout the numbers differ.
    no_dropout = with_lora(tiny_llama())
    fuse_lora(no_dropout)
    assert not torch.allclose(forward_backward(no_dropout)[0], got[0], atol=1e-3)


def test_checkpointing_replays_the_masks_exactly():
    model = with_lora(tiny_llama(), dropout=0.2)
    fuse_lora(model)
    model.train()
    torch.manual_seed(5)
    plain = forward_backward(model)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(5)
    calls = []
    real = FusedLora.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedLora, "apply", lambda *a: calls.append(1) or real(*a))
        checkpointed = forward_backward(model)
    assert len(calls) == 16  # each group ran again in backward: the layers did recompute
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert checkpointed[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], rtol=0, atol=0, msg=name)
    groups = {m.forward.group for m in model.modules() if isinstance(m.__dict__.get("forward"), fused_lora._Member)}
    assert len(groups) == 8 and not any(g.split or g.entry is not None for g in groups)  # the recompute fused too
    torch.manual_seed(6)  # another seed, other masks
    assert not torch.equal(forward_backward(model)[1]["inputs_embeds"], plain[1]["inputs_embeds"])


def test_eval_mode_means_no_dropout():
    model = with_lora(tiny_llama(), dropout=0.5)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    fuse_lora(model)
    with torch.no_grad():
        assert_relatively_close(model(input_ids=IDS).logits, reference, 1e-5, "eval logits")
        assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    with torch.inference_mode():
        assert_relatively_close(model(input_ids=IDS).logits, reference, 1e-5, "inference-mode logits")


# ---------------------------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_is_close_to_fp32_and_adapter_grads_stay_fp32():
    model = with_lora(tiny_llama())
    fp32 = forward_backward(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16 = forward_backward(model)
    fuse_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = forward_backward(model)
    assert logits.dtype == torch.bfloat16 == peft_bf16[0].dtype
    assert_relatively_close(logits, fp32[0], 3e-2, "logits")
    for name, grad in grads.items():
        if "lora_" in name:
            assert grad.dtype == torch.float32, name
        want = fp32[1][name]
        # bf16 has 8 bits of mantissa: the fused path must be as close to fp32 as PEFT's own autocast run.
        peft_error = (peft_bf16[1][name].float() - want).abs().max().item()
        error = (grad.float() - want).abs().max().item()
        assert error <= 2 * peft_error + 1e-2 * want.abs().max().item(), name


# ----------------------------------------------------------------------------------------------------- QLoRA
QLORA = {"load_in": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def test_qlora_parity_with_peft_linear4bit(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit

    from tuneforge.models.adapters import prepare_quantized
    from tuneforge.models.loading import Quantization, load_model, resolve_model

    source = resolve_model(str(tiny_model_dir))
    source.quantization = Quantization.from_model_config(QLORA)
    model = with_lora(prepare_quantized(load_model(source), gradient_checkpointing=False))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    ids = torch.arange(100, 148).reshape(2, 24)
    reference = forward_backward(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16 = forward_backward(model, ids)
    assert fuse_lora(model) == (14, 8)
    assert_same_run(forward_backward(model, ids), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = forward_backward(model, ids)
    assert_relatively_close(logits, peft_bf16[0], 3e-2, "bf16 logits")
    assert all(grads[name].dtype == torch.float32 for name in grads if "lora_" in name)


# ---------------------------------------------------------------------------------------------- PEFT semantics
def test_disable_adapter_gives_the_base_model():
    base = tiny_llama()
    with torch.no_grad():
        want = base(input_ids=IDS).logits
    model = with_lora(base, dropout=0.1)
    fuse_lora(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=IDS).logits, want)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=IDS).logits, want, atol=1e-4)


def test_merged_adapters_fall_back_to_peft():
    model = with_lora(tiny_llama())
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    fuse_lora(model)
    model.merge_adapter()
    with torch.no_grad():
        assert_relatively_close(model(input_ids=IDS).logits, want, 1e-5, "merged")
    model.unmerge_adapter()
    with torch.no_grad():
        assert_relatively_close(model(input_ids=IDS).logits, want, 1e-5, "unmerged")


def test_dora_falls_back_visibly_and_matches_peft():
    model = with_lora(tiny_llama(), use_dora=True)
    reference = forward_backward(model)
    lines = []
    fuse_lora(model, lines.append)
    assert len(lines) == 1 and "DoRA" in lines[0] and "PEFT" in lines[0]
    calls = []
    real = FusedLora.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedLora, "apply", lambda *a: calls.append(1) or real(*a))
        got = forward_backward(model)
    assert not calls
    assert_same_run(got, reference, tol=0)


def test_members_called_with_different_inputs_compute_their_own():
    model = with_lora(tiny_llama())
    attention = model.get_base_model().model.layers[0].self_attn
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    want = [attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x1)]
    fuse_lora(model)
    got = [attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x1)]
    for g, w in zip(got, want):
        assert_relatively_close(g, w, 1e-5, "projection")
    assert attention.q_proj.forward.group.split and attention.q_proj.forward.group.entry is None
    # A forward stopped after the first member (early-stopping recomputation) leaves an entry behind: dropped,
    # the group stays fused; only members that keep not asking for their outputs split it.
    mlp = model.get_base_model().model.layers[0].mlp
    group = mlp.gate_proj.forward.group
    mlp.gate_proj(x1)
    assert group.entry is not None
    for layer in (mlp.gate_proj, mlp.up_proj):  # a new forward: the stale entry is replaced, nothing splits
        assert_relatively_close(layer(x2), type(layer).forward(layer, x2), 1e-5, "mlp")
    assert group.entry is None and group.stale == 0 and not group.split
    for _ in range(fused_lora._Group.STALE_LIMIT + 1):  # up_proj never asks: after a few times, split
        mlp.gate_proj(x1)
    assert group.split


def test_a_deep_copy_runs_its_own_weights():
    import copy

    model = with_lora(tiny_llama())
    fuse_lora(model)
    twin = copy.deepcopy(model)
    assert fused_members(twin) == 14
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if "lora_B" in name:
                parameter.mul_(2)
        assert not torch.allclose(twin(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-4)
    attention = twin.get_base_model().model.layers[0].self_attn
    assert attention.q_proj.forward.module is attention.q_proj
    assert attention.q_proj.forward.group.members[1] is attention.k_proj


def test_generation_with_kv_cache_through_the_fused_path():
    model = with_lora(tiny_llama(), dropout=0.1)
    model.eval()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(input_ids=IDS[:, :8], **settings)
    fuse_lora(model)
    with torch.no_grad():
        got = model.generate(input_ids=IDS[:, :8], **settings)
    assert torch.equal(got, want)


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    model = with_lora(tiny_llama())
    fuse_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert fused_members(loaded) == 0
    with torch.no_grad():
        assert_relatively_close(loaded(input_ids=IDS).logits, want, 1e-5, "loaded")


# ------------------------------------------------------------------------------------------------- training
def test_training_run_fused_and_unfused_give_the_same_losses(make_config, qa_file, tmp_path):
    losses = {}
    for fused in (True, False):
        config = make_config(qa_file, lora={"fused": fused},
                             train={"max_steps": 30, "output_dir": str(tmp_path / f"run-{fused}")})
        assert config.lora.fused is fused
        summary = run_training(config, log=lambda _m: None)
        assert summary["steps"] == 30
        losses[fused] = [r["loss"] for r in read_metrics(tmp_path / f"run-{fused}" / "metrics.jsonl") if "loss" in r]
    assert len(losses[True]) == 30
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_build_model_installs_the_fused_path_by_default(make_config, qa_file):
    for fused, expected in ((True, 14), (False, 0)):
        config = make_config(qa_file, lora={"fused": fused}, train={"max_steps": 1})
        recipe = Trainer(config, log=lambda _m: None, show_progress=False, run_dir=False)
        recipe.setup()
        assert fused_members(recipe.model) == expected


# --------------------------------------------------------------------------------------------------- memory
def saved_bytes(model, run) -> tuple[int, int]:
    """(bytes, bool bytes) of the distinct storages ``run()`` keeps for backward, parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = (storage.nbytes(), tensor.dtype == torch.bool)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = run()  # kept alive until counted, so no storage is freed and reused meanwhile
    del outputs
    return sum(n for n, _ in seen.values()), sum(n for n, b in seen.values() if b)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_group_saves_x_once_one_mask_and_the_rank_sized_h(dropout):
    model = with_lora(tiny_llama(), dropout=dropout)
    model.train()
    use_fast_dropout(model)
    attention = model.get_base_model().model.layers[1].self_attn
    x = torch.randn(2, 24, 64, requires_grad=True)

    def run():
        return [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]

    peft_bytes, peft_masks = saved_bytes(model, run)
    fuse_lora(model)
    fused_bytes, fused_masks = saved_bytes(model, run)
    x_bytes, mask_bytes, h_bytes = x.numel() * 4, x.numel(), 2 * 24 * 3 * 4 * 4  # h: (2, 24, 3 x r=4) fp32
    if dropout == 0:
        # Nothing dropout-shaped; PEFT keeps x itself (one storage) for each A as well.
        assert (fused_bytes, fused_masks) == (x_bytes + h_bytes, 0) == (peft_bytes, peft_masks)
    else:
        # PEFT: a dropped-out copy of x and a mask per adapter; fused: x and one mask for the three.
        assert (fused_bytes, fused_masks) == (x_bytes + mask_bytes + h_bytes, mask_bytes)
        assert (peft_bytes, peft_masks) == (3 * x_bytes + 3 * mask_bytes + h_bytes, 3 * mask_bytes)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_saves_less_for_backward(dropout):
    model = with_lora(tiny_llama(), dropout=dropout)
    model.train()
    use_fast_dropout(model)
    peft_bytes, _ = saved_bytes(model, lambda: model(input_ids=IDS).logits)
    fuse_lora(model)
    fused_bytes, fused_masks = saved_bytes(model, lambda: model(input_ids=IDS).logits)
    if dropout == 0:
        assert fused_masks == 0 and fused_bytes <= peft_bytes
    else:  # per layer q/k/v drop two copies of x, gate/up one: at least three (tokens, 64) fp32 tensors
        assert peft_bytes - fused_bytes >= 2 * 3 * IDS.numel() * 64 * 4

"""RMSNorm and SwiGLU with hand-written backward (models/lean_activations.py): exact outputs and gradients
against transformers' modules, the same dtypes under autocast, less kept for backward, unknown modules untouched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from tuneforge.models.lean_activations import (RMSNormFunction, SiluMulFunction, restore_activations,
                                               use_lean_activations)

H, I, VOCAB = 64, 128, 128
TINY = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b in the 2-norm (elementwise ratios blow up where b is near 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights, so dw and the w in dx are exercised
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(model, ids, autocast=False) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(ids)
    return sum(seen.values())


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(7)
    with torch.no_grad():  # B = 0 would make the adapters' gradients trivially equal
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def run(model, ids, autocast=False):
    """Logits and the gradient of every trainable parameter for a fixed scalar loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(ids).logits
    torch.manual_seed(3)
    weights = torch.randn(logits.shape, dtype=torch.float32)
    (logits.float() * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def patched(model):
    lean = copy.deepcopy(model)
    messages = []
    count = use_lean_activations(lean, messages.append)
    return lean, count, messages


# ---- the functions against the modules -------------------------------------------------------------------------


def _norm_inputs(shape: str, dtype=torch.float32):
    torch.manual_seed(11)
    if shape == "3d":
        x = torch.randn(3, 17, H, dtype=dtype)
    elif shape == "2d":
        x = torch.randn(19, H, dtype=dtype)
    else:  # non-contiguous: (batch, seq, hidden) seen through a transpose
        x = torch.randn(3, H, 17, dtype=dtype).transpose(1, 2)
        assert not x.is_contiguous()
    return (x * 3 + 0.5).requires_grad_(True)


@pytest.mark.parametrize("shape", ["3d", "2d", "strided"])
def test_rmsnorm_matches_llama_rmsnorm_float32(shape):
    norm = LlamaRMSNorm(H, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
    x = _norm_inputs(shape)
    g = torch.randn(x.shape)
    y_ref = norm(x)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    y = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), g)
    assert torch.equal(y, y_ref)  # the same ops in the same order
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.dtype == norm.weight.dtype
    assert rel(dx, dx_ref) < 1e-6 and rel(dw, dw_ref) < 1e-6


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_bfloat16_input_keeps_the_module_dtypes(weight_dtype):
    # bf16 x with a float32 weight: autocast over a float32 model, or QLoRA's upcast norms.
    norm = LlamaRMSNorm(H).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = _norm_inputs("3d", torch.bfloat16)
    y_ref = norm(x)
    y = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    g = torch.randn(x.shape).to(y.dtype)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), g)
    assert dx.dtype == torch.bfloat16 and dw.dtype == weight_dtype
    assert rel(dx, dx_ref) < 1e-2 and rel(dw, dw_ref) < 1e-2


def test_rmsnorm_keeps_only_x_weight_and_rstd_and_skips_frozen_weight():
    x = _norm_inputs("3d", torch.bfloat16)
    weight = torch.ones(H, requires_grad=False)
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = RMSNormFunction.apply(x, weight, 1e-6)
    assert kept == [(torch.bfloat16, (3, 17, H)), (torch.float32, (H,)), (torch.float32, (3, 17, 1))]
    y.float().sum().backward()
    assert x.grad is not None and weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_act_fn_times_up(dtype):
    torch.manual_seed(5)
    gate = (torch.randn(3, 17, I) * 4).to(dtype).requires_grad_(True)
    up = torch.randn(3, 17, I).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 17, I).to(dtype)
    y_ref = ACT2FN["silu"](gate) * up
    ref = torch.autograd.grad(y_ref, (gate, up), dy)
    y = SiluMulFunction.apply(gate, up)
    got = torch.autograd.grad(y, (gate, up), dy)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        assert rel(a, b) < 1e-6
    # Plain autograd keeps g, silu(g) and u; the function keeps g and u.
    element = gate.element_size() * gate.numel()
    assert saved_bytes(lambda: ACT2FN["silu"](gate) * up) == 3 * element
    assert saved_bytes(lambda: SiluMulFunction.apply(gate, up)) == 2 * element


def test_silu_mul_strided_2d():
    torch.manual_seed(6)
    gate = torch.randn(I, 9).t().requires_grad_(True)
    up = torch.randn(9, I).requires_grad_(True)
    dy = torch.randn(9, I)
    ref = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), dy)
    got = torch.autograd.grad(SiluMulFunction.apply(gate, up), (gate, up), dy)
    assert all(rel(a, b) < 1e-6 for a, b in zip(got, ref))


# ---- a whole model -----------------------------------------------------------------------------------------------

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def test_full_fine_tuning_logits_and_every_gradient_match():
    plain = tiny_llama().train()
    lean, count, messages = patched(plain)
    assert count == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    assert messages == ["lean activations: 5 norms, 2 MLPs"]
    logits_ref, grads_ref = run(plain, IDS)
    logits, grads = run(lean, IDS)
    assert rel(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-5, name


def test_lora_logits_and_adapter_gradients_match():
    plain = with_lora(tiny_llama()).train()
    lean, count, _ = patched(plain)
    assert count == 7
    logits_ref, grads_ref = run(plain, IDS)
    logits, grads = run(lean, IDS)
    assert rel(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and all("lora_" in n for n in grads)
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_autocast_is_close_to_the_plain_model(lora):
    plain = tiny_llama().train()
    plain = with_lora(plain) if lora else plain
    lean, _, _ = patched(plain)
    logits_ref, grads_ref = run(plain, IDS, autocast=True)
    logits, grads = run(lean, IDS, autocast=True)
    assert logits.dtype == logits_ref.dtype
    # The forward runs the same ops as the modules, so even in bf16 the logits are the same bits.
    assert torch.equal(logits, logits_ref)
    # The residual stream, and so every norm's input, stays float32 under autocast of a float32 model, and
    # silu's backward is autograd's own kernel: the gradients agree to float32 rounding, not just bf16's.
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype == torch.float32
        assert rel(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("lora", [False, True])
def test_bfloat16_model_is_close_to_the_plain_model(lora):
    plain = tiny_llama().to(torch.bfloat16).train()
    plain = with_lora(plain) if lora else plain.requires_grad_(True)
    lean, _, _ = patched(plain)
    logits_ref, grads_ref = run(plain, IDS)
    logits, grads = run(lean, IDS)
    assert torch.equal(logits, logits_ref)
    # bf16 norm inputs: dx and dw round differently from autograd's chain (float32 inside, one rounding at the
    # end); bf16 training itself is about 1e-2 away from float32 on this model.
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype  # bf16; PEFT keeps adapters in float32
        assert rel(grads[name], grads_ref[name]) < 1e-2, name


def test_module_output_dtypes_under_autocast_match():
    plain = tiny_llama()
    lean, _, _ = patched(plain)

    def dtypes(model):
        out = []
        hooks = [m.register_forward_hook(lambda m, i, o: out.append((type(m).__name__, i[0].dtype, o.dtype)))
                 for m in model.modules() if isinstance(m, (LlamaRMSNorm, LlamaMLP))]
        with torch.autocast("cpu", torch.bfloat16):
            model(IDS)
        for h in hooks:
            h.remove()
        return out

    assert dtypes(lean) == dtypes(plain)


@pytest.mark.parametrize("lora", [False, True])
def test_non_reentrant_checkpointing_gives_the_same_gradients(lora):
    model = tiny_llama().train()
    model = with_lora(model) if lora else model
    lean, _, _ = patched(model)
    logits, grads = run(lean, IDS)
    lm = lean.get_base_model() if lora else lean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert lm.model.layers[0].gradient_checkpointing
    logits_ckpt, grads_ckpt = run(lean, IDS)
    assert torch.equal(logits_ckpt, logits)
    for name in grads:
        assert rel(grads_ckpt[name], grads[name]) < 1e-6, name


@pytest.mark.parametrize("dtype, lora", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                         (torch.bfloat16, True)])
def test_saved_bytes_drop_by_at_least_the_expected_amount(dtype, lora):
    plain = tiny_llama().to(dtype)
    plain = with_lora(plain) if lora else plain.requires_grad_(True)
    lean, _, _ = patched(plain)
    tokens, layers, b = IDS.numel(), TINY["num_hidden_layers"], torch.finfo(dtype).bits // 8
    # Per MLP: silu(g) is no longer kept (I·b per token).
    expected = layers * tokens * I * b
    # Per norm: plain keeps the float32 upcast (4 bytes, the x itself in float32) and, with a trainable
    # weight, the normalised x (b); the function keeps x (b). The first norm's input (the embeddings) needs no
    # gradient under LoRA, so there nothing is kept either way.
    norms = 2 * layers + 1 - (1 if lora else 0)
    per_norm = (4 if dtype != torch.float32 else 0) - (b if dtype != torch.float32 else 0) + (0 if lora else b)
    expected += norms * tokens * H * per_norm
    before, after = activation_bytes(plain, IDS), activation_bytes(lean, IDS)
    assert after < before
    assert before - after >= expected, (before, after, expected)


def test_saved_bytes_drop_under_autocast():
    plain = tiny_llama()
    lean, _, _ = patched(plain)
    # bf16 gate/up: silu(g) at 2 bytes per MLP; float32 residual stream: x̂ at 4 bytes per norm.
    expected = IDS.numel() * (2 * I * 2 + 5 * H * 4)
    assert activation_bytes(plain, IDS, True) - activation_bytes(lean, IDS, True) >= expected


# ---- what is and is not patched ----------------------------------------------------------------------------------


def test_gate_then_up_on_the_same_input_object():
    lean, _, _ = patched(tiny_llama())
    calls = []
    mlp = lean.model.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        getattr(mlp, name).register_forward_pre_hook(lambda m, args, name=name: calls.append((name, id(args[0]))))
    x = torch.randn(2, 3, H)
    mlp(x)
    assert calls == [("gate_proj", id(x)), ("up_proj", id(x))]


def test_patch_is_per_instance_idempotent_and_reversible():
    plain = tiny_llama()
    lean, count, _ = patched(plain)
    assert "forward" not in vars(plain.model.layers[0].mlp) and "forward" not in vars(plain.model.norm)
    assert LlamaMLP.forward.__qualname__ == "LlamaMLP.forward"
    assert "forward" in vars(lean.model.layers[0].mlp)
    messages = []
    assert use_lean_activations(lean, messages.append) == count  # already patched: counted, not re-wrapped
    assert restore_activations(lean) == count
    assert "forward" not in vars(lean.model.norm)
    assert torch.equal(lean(IDS).logits, plain(IDS).logits)


def test_unknown_norms_and_mlps_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    class ScaledRMSNorm(LlamaRMSNorm):  # same attributes, another formula
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    gelu = LlamaConfig(**{**TINY, "hidden_act": "gelu"})
    model = torch.nn.ModuleDict({
        "gemma_norm": GemmaRMSNorm(H), "scaled_norm": ScaledRMSNorm(H), "gelu_mlp": LlamaMLP(gelu),
        "silu_mlp": LlamaMLP(LlamaConfig(**TINY)), "norm": LlamaRMSNorm(H)})
    messages = []
    assert use_lean_activations(model, messages.append) == 2
    for name in ("gemma_norm", "scaled_norm", "gelu_mlp"):
        assert "forward" not in vars(model[name]), name
    assert "forward" in vars(model["silu_mlp"]) and "forward" in vars(model["norm"])
    assert messages == ["lean activations: 1 norms, 1 MLPs; GemmaRMSNorm left as is (not the Llama formula), "
                        "LlamaMLP left as is (not the Llama formula), ScaledRMSNorm left as is (not the Llama "
                        "formula)"]


def test_qwen2_is_recognised():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(Qwen2Config(**TINY)).train()
    lean, count, _ = patched(plain)
    assert count == 7
    logits_ref, grads_ref = run(plain, IDS)
    logits, grads = run(lean, IDS)
    assert rel(logits, logits_ref) < 1e-5
    assert all(rel(grads[n], grads_ref[n]) < 1e-5 for n in grads)


def test_train_config_switch_defaults_on():
    from tuneforge.config_sections import TrainConfig

    assert TrainConfig().fused_activations is True
    assert "fused_activations:" in TrainConfig.__doc__

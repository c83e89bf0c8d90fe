"""Leaner activations for Llama-family decoders: RMSNorm and SwiGLU that keep less for backward.

``train.fused_activations``. Liger Kernel's idea on the PyTorch path (no Triton, so it runs on CPU too): write
the backward of RMSNorm and of SwiGLU's gating by hand, so autograd keeps only what those formulas need and
recomputes the rest, instead of every intermediate the elementwise ops leave behind. Gradients are exact (the
formulas autograd applies); forward outputs are bit-identical to transformers' modules, dtypes included, with
or without autocast.

Kept for backward per token (H hidden size, I intermediate size, b bytes per element of the activations;
"plain" is the transformers module under autograd):

* RMSNorm, plain: the float32 upcast of x (4H; x itself when x is float32, a new copy when it is bf16), rstd
  (4 bytes), and with a trainable weight the normalised x̂ in x's dtype (bH). Lean: x (bH) and rstd.
  Less per norm: float32 x: 4H with a trainable weight, nothing under LoRA (the upcast is x itself);
  bf16 x: 4H with a trainable weight, 2H under LoRA (x in bf16 instead of its float32 copy).
* SwiGLU ``act_fn(gate_proj(x)) * up_proj(x)``, plain: g (silu's backward), silu(g) and u (the product's):
  3bI. Lean: g and u, 2bI; silu(g) and sigmoid(g) are recomputed in backward. Less per MLP: bI.

The product silu(g)·u is still kept by ``down_proj`` (or its LoRA ``lora_A``), as before. On a SmolLM-135M
layer (H 576, I 1536) at batch 4 x 256 tokens, measured with saved-tensor hooks: float32 full fine-tuning
45.7 -> 34.7 MB per layer (6.29 MB from the MLP, 2.36 MB from each norm), float32 LoRA 41.2 -> 34.9 MB,
bf16 autocast over float32 LoRA 34.9 -> 31.8 MB, bf16 full fine-tuning 25.2 -> 17.4 MB.

RoPE is left alone: plain autograd keeps only cos and sin for it (shared by all layers), so a hand-written
backward would save nothing, and it is a module-level function of each modeling file (patching it would change
every model in the process).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap
import types
from typing import Callable, Optional

import torch

_MARK = "_tuneforge_lean"  # attribute set on patched modules (idempotence, and restore_activations)


def _no_autocast(t: torch.Tensor):
    """Autocast off for the explicit dtype handling below. None of these ops is on autocast's cast lists for
    the dtypes they see here (pow and rsqrt only ever get float32), so this changes nothing in forward; in
    backward it keeps the hand-written casts authoritative when ``loss.backward()`` runs inside autocast."""
    device_type = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm as transformers' ``LlamaRMSNorm`` computes it, keeping only x, w and one rstd per row.

    Forward, x: (..., H) in its own dtype (float32, bfloat16, float16), w: (H,)::

        rstd = 1 / sqrt(mean(x32², -1) + eps)           x32 = x in float32; rstd: (..., 1) float32
        x̂    = (x32 · rstd).to(x.dtype)                 normalised in float32, cast back like LlamaRMSNorm
        y    = w ⊙ x̂                                    dtype: torch.result_type(w, x), as ``self.weight * ...``

    Backward, with g = dL/dy (..., H) and n = x32 · rstd recomputed::

        gw = (g ⊙ w) in x.dtype, then float32         the rounding autograd applies through the cast
        dx = rstd · (gw − n · mean(gw ⊙ n, -1))       (x.dtype)
        dw = Σ_rows g ⊙ x̂   (float32 sum, w.dtype)    only when w requires grad (full fine-tuning)

    Saved for backward: x (not its float32 upcast, not x̂), w (a parameter: no extra memory) and rstd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with _no_autocast(x):
            # The very ops of LlamaRMSNorm.forward, so the output is bit-identical.
            x32 = x.to(torch.float32)
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = dw = None
        with _no_autocast(grad):
            n = x.to(torch.float32) * rstd  # recomputed x32 · rstd, (..., H) float32
            if ctx.needs_input_grad[0]:
                # Autograd casts the gradient of x̂ to x.dtype (the .to(input_dtype) node) before the
                # float32 normalisation backward; doing the same keeps bf16 runs close to the plain module.
                gw = (grad * weight).to(x.dtype).to(torch.float32)
                dx = ((gw - n * (gw * n).mean(-1, keepdim=True)) * rstd).to(x.dtype)
            if ctx.needs_input_grad[1]:
                # Frozen under LoRA: skipped, which also skips a (..., H) float32 product.
                x_hat = n.to(x.dtype).to(torch.float32)  # x̂ exactly as the forward multiplied it
                prod = grad.to(torch.float32) * x_hat
                dw = prod.reshape(-1, prod.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


class SiluMulFunction(torch.autograd.Function):
    """SwiGLU's gating y = silu(g) ⊙ u (LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)``), keeping g and u only.

    g, u: (..., I); y: (..., I) in torch.result_type(g, u), silu(g) computed in g's dtype as ``act_fn`` does.
    Backward, σ = sigmoid(g) recomputed::

        du = dy ⊙ silu(g)                              (u.dtype)
        dg = (dy ⊙ u) ⊙ σ(g) · (1 + g · (1 − σ(g)))     (g.dtype)

    dg is computed by ``aten.silu_backward``, the kernel autograd itself uses for silu (exactly that formula,
    sigmoid recomputed in the kernel, one pass with no float32 temporaries), so gradients are bit-identical to
    the plain module in every dtype. Saved bytes per element of (..., I): plain autograd keeps g, silu(g) and u
    (3·b); this keeps g and u (2·b).
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        with _no_autocast(gate):
            y = torch.nn.functional.silu(gate) * up
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        with _no_autocast(grad):
            if ctx.needs_input_grad[0]:
                # The product's backward hands silu's output (g's dtype) the gradient dy ⊙ u in that dtype.
                d_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
            if ctx.needs_input_grad[1]:
                d_up = (grad * torch.nn.functional.silu(gate)).to(up.dtype)
        return d_gate, d_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SiluMulFunction.apply(gate, up)


def _lean_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    # gate_proj, then up_proj, on the same x object: fused LoRA gate/up adapters cache on the input's identity.
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


# ---- recognising the modules ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_body(cls: type) -> Optional[str]:
    """The AST of ``cls.forward`` (signature and body, names included, no docstring or comments), or None when
    its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef):
        return None
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # a docstring is not code
    return ast.dump(func.args) + ast.dump(ast.Module(body=body, type_ignores=[]))


@functools.lru_cache(maxsize=None)
def _reference(kind: str) -> Optional[str]:
    from transformers.models.llama import modeling_llama

    return _forward_body(modeling_llama.LlamaRMSNorm if kind == "norm" else modeling_llama.LlamaMLP)


def _is_llama_norm(module: torch.nn.Module) -> bool:
    """A norm whose class's forward is, statement for statement, ``LlamaRMSNorm.forward`` (Qwen2/3, Mistral,
    Mixtral, Phi3, Granite, SmolLM3, ... copy it verbatim). Gemma's ``(1 + w)``, Olmo2's weight-before-cast and
    any other variant read differently and are left alone."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, (int, float)):
        return False
    reference = _reference("norm")
    return reference is not None and _forward_body(type(module)) == reference


def _is_silu(act: object) -> bool:
    from transformers.activations import SiLUActivation

    # Only the stock forwards: a kernel-hub replacement of SiLUActivation.forward is someone else's code.
    if type(act) is torch.nn.SiLU:
        return True
    return type(act) is SiLUActivation and _forward_body(type(act)) == _forward_body(SiLUActivation)


def _is_llama_mlp(module: torch.nn.Module) -> bool:
    """An MLP whose forward is ``LlamaMLP.forward`` verbatim, with gate/up/down projections and a SiLU act_fn
    (``config.hidden_act`` "silu" where the module has a config). Gemma's MLP has the same forward with a gelu."""
    if not all(isinstance(getattr(module, name, None), torch.nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    if not _is_silu(getattr(module, "act_fn", None)):
        return False
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        return False
    reference = _reference("mlp")
    return reference is not None and _forward_body(type(module)) == reference


def _looks_like(module: torch.nn.Module) -> Optional[str]:
    """'norm' or 'mlp' for modules a reader would expect to be patched (so leaving one alone is worth a log)."""
    name = type(module).__name__
    if hasattr(module, "variance_epsilon") or name.endswith("RMSNorm"):
        return "norm"
    if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
        return "mlp"
    return None


def use_lean_activations(model: torch.nn.Module, log: Callable[[str], None]) -> int:
    """Route the RMSNorms and SwiGLU MLPs of a loaded HF causal LM (PEFT-wrapped or not) through
    :class:`RMSNormFunction` and :class:`SiluMulFunction`, in place; returns how many modules use them.

    Each recognised module gets its own bound ``forward`` (the class is untouched, so other models in the
    process are not affected, and ``state_dict``, checkpoints and adapters are unchanged). Modules that do not
    match are left as they are and named in the one log line. Calling it twice patches nothing new.
    """
    from tuneforge.models.adapters import causal_lm

    norms = mlps = 0
    left: dict[str, str] = {}
    for module in causal_lm(model).modules():
        kind = _looks_like(module)
        if kind is None:
            continue
        if getattr(module, _MARK, False):
            norms, mlps = norms + (kind == "norm"), mlps + (kind == "mlp")
            continue
        cls = type(module).__name__
        if "forward" in vars(module):
            # Someone (accelerate's device hooks, another patch) already wraps this instance's forward.
            left.setdefault(cls, "its forward is already wrapped")
            continue
        if kind == "norm" and _is_llama_norm(module):
            module.forward = types.MethodType(_lean_norm_forward, module)
            norms += 1
        elif kind == "mlp" and _is_llama_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            mlps += 1
        else:
            left.setdefault(cls, "not the Llama formula")
            continue
        setattr(module, _MARK, True)
    message = f"lean activations: {norms} norms, {mlps} MLPs"
    if left:
        message += "; " + ", ".join(f"{cls} left as is ({why})" for cls, why in sorted(left.items()))
    log(message)
    return norms + mlps


def restore_activations(model: torch.nn.Module) -> int:
    """Undo :func:`use_lean_activations` (the class's forward applies again); returns how many modules."""
    restored = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            vars(module).pop("forward", None)
            delattr(module, _MARK)
            restored += 1
    return restored

"""A fused LoRA path: PEFT's adapters, computed by one autograd function per group of projections that read the
same input.

PEFT's ``lora.Linear`` computes ``base(x) + s * B(A(dropout(x)))`` on its own, so on Llama the q, k and v
projections (and gate and up) each draw a dropout mask, each run an A-matmul over the same x and each keep their
own dropped-out copy of x (hidden-sized, per token) for backward. :class:`FusedLora` does the group at once: one
mask, one matmul with the members' A matrices stacked, per-member B matmuls on the rank-sized result, and for
backward only x (once), the boolean mask and the rank-sized intermediate are kept. At dropout 0 (or in eval mode)
nothing dropout-shaped is drawn, computed or kept.

:func:`fuse_lora` installs it on a PEFT model without moving anything: PEFT's modules and parameters stay where
they are (``save_pretrained`` writes the standard adapter, merging works), only each adapted layer's ``forward``
is replaced by a :class:`_Member` that either runs the group's fused call (the first member called with a tensor
x computes every member's output and the others collect theirs) or, whenever PEFT's semantics differ from plain
LoRA (adapters disabled or merged, several active adapters, DoRA or another variant, LoRA bias, extra forward
arguments, torch.compile tracing), hands the call to PEFT's own forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tuneforge.models.dropout import FastDropout, keep_mask, quantized_probability

# Sibling projections that read the same tensor in the architectures transformers ships (Llama-style attention
# and gated MLPs, BERT-style attention, Mixtral's experts). Other adapted linears are groups of one; a grouping
# that turns out wrong at run time only splits itself (see _Group.split), it is never incorrect.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


class _Plan:
    """The non-tensor part of one fused call: per member rank r_i, output width out_i and scale s_i, the dropout
    probability p (0: none), the dtypes of the adapter branch and the base matmul, and which bases are 4-bit."""

    __slots__ = ("ranks", "scales", "p", "drop_scale", "lora_dtype", "base_dtype", "out_dtype", "device_type",
                 "quant_states")

    def __init__(self, ranks, scales, p, drop_scale, lora_dtype, base_dtype, out_dtype, device_type, quant_states):
        self.ranks, self.scales, self.p, self.drop_scale = ranks, scales, p, drop_scale
        self.lora_dtype, self.base_dtype, self.out_dtype = lora_dtype, base_dtype, out_dtype
        self.device_type, self.quant_states = device_type, quant_states


def _draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of x's shape (bool, True = kept). Both come from the global generator of x's device, so
    activation checkpointing (which restores the RNG state before recomputing) draws the same mask again."""
    if x.device.type == "cpu":
        return keep_mask(x.shape, p)  # p already quantized; 64 random bits give four draws (models/dropout.py)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """drop(x): x * mask / (1 - p) in x's dtype, as PEFT's dropout computes it before the adapter's cast."""
    return x if mask is None else x.mul(mask).mul_(scale)


def _base_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (out, in) in ``dtype``; a 4-bit one is dequantised here (for forward, and again for
    backward's dx) rather than kept: the float copy is as big as the layer."""
    if quant_state is not None:
        import bitsandbytes.functional as bnbF

        weight = bnbF.dequantize_4bit(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class FusedLora(torch.autograd.Function):
    """y_i = x W_iᵀ (+ b_i) + s_i · (drop(x) A_catᵀ)[..., slice_i] B_iᵀ for every member i of a group.

    ``apply(plan, x, W_1, b_1, A_1, B_1, ..., W_n, b_n, A_n, B_n)`` with x (..., in), W_i (out_i, in) (or a 4-bit
    ``Params4bit`` with ``plan.quant_states[i]``), b_i (out_i,) or None, A_i (r_i, in), B_i (out_i, r_i); returns
    (y_1 (..., out_1), ..., y_n (..., out_n)). h = drop(x) A_catᵀ is (..., R) with R = Σ r_i.

    Under autocast every matmul runs in the autocast dtype (x, W, A, B cast once here, autocast itself switched
    off inside); otherwise the base matmul runs in x's dtype and the adapter branch in the adapter's dtype, as
    PEFT does. Gradients come back in each input's own dtype (fp32 master weights stay fp32).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, x: torch.Tensor, *params: torch.Tensor):
        weights, biases, lora_a, lora_b = params[0::4], params[1::4], params[2::4], params[3::4]
        ld, bd = plan.lora_dtype, plan.base_dtype
        with torch.autocast(plan.device_type, enabled=False):
            mask = _draw_mask(x, plan.p) if plan.p > 0 else None
            xl = _dropped(x, mask, plan.drop_scale).to(ld)
            a_cat = lora_a[0].to(ld) if len(lora_a) == 1 else torch.cat([a.to(ld) for a in lora_a])
            h = F.linear(xl, a_cat)  # (..., R): the one A-matmul of the group
            del xl
            xb = x.to(bd)
            outputs, start = [], 0
            for weight, bias, b, quant, r, s in zip(weights, biases, lora_b, plan.quant_states, plan.ranks,
                                                    plan.scales):
                base = F.linear(xb, _base_weight(weight, quant, bd), None if bias is None else bias.to(bd))
                # (h_i B_iᵀ) · s_i, then added: PEFT's order of rounding (its result + lora_B(...) * scaling).
                lora = F.linear(h[..., start:start + r], b.to(ld)).mul_(s)
                out = base.add_(lora) if base.dtype == lora.dtype else base + lora
                outputs.append(out.to(plan.out_dtype))
                start += r
        needs = ctx.needs_input_grad
        a_grad = any(needs[4 + 4 * i] for i in range(len(weights)))
        b_grad = any(needs[5 + 4 * i] for i in range(len(weights)))
        # Kept for backward: x once (only if dA needs it), the bool mask, h (only if dB needs it) and the weights
        # (references; 4-bit ones are read back from ctx with their quant state instead).
        plain_weights = [None if q is not None else w for w, q in zip(weights, plan.quant_states)]
        ctx.save_for_backward(x if a_grad else None, mask, h if b_grad else None, *plain_weights, *lora_a, *lora_b)
        ctx.quantized = [w if q is not None else None for w, q in zip(weights, plan.quant_states)]
        ctx.plan = plan
        ctx.bias_dtypes = [None if bias is None else bias.dtype for bias in biases]
        ctx.x_meta = (x.shape, x.dtype)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        """From dy_i (..., out_i): dh_i = s_i dy_i B_i, dB_i = s_i dy_iᵀ h_i, dA_cat = dhᵀ drop(x),
        dx = Σ dy_i W_i + drop-backward(dh A_cat); each only when its input needs it."""
        plan, needs = ctx.plan, ctx.needs_input_grad
        n = len(plan.ranks)
        x, mask, h, *rest = ctx.saved_tensors
        weights = [w if w is not None else q for w, q in zip(rest[:n], ctx.quantized)]
        lora_a, lora_b = rest[n:2 * n], rest[2 * n:]
        ld, bd = plan.lora_dtype, plan.base_dtype
        x_shape, x_dtype = ctx.x_meta
        width = x_shape[-1]
        result: list[torch.Tensor | None] = [None] * (2 + 4 * n)
        need_x = needs[1]
        need_a = any(needs[4 + 4 * i] for i in range(n))
        with torch.autocast(plan.device_type, enabled=False):
            dys = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, out_i)
            dys_l = [g.to(ld) for g in dys]
            if h is not None:
                h = h.reshape(-1, h.shape[-1])
            dh_parts, start = [], 0
            for i, (dy, b, r, s) in enumerate(zip(dys_l, lora_b, plan.ranks, plan.scales)):
                if needs[5 + 4 * i]:
                    result[5 + 4 * i] = (dy.t() @ h[:, start:start + r]).mul_(s).to(b.dtype)  # (out_i, r_i)
                if need_a or need_x:
                    dh_parts.append((dy @ b.to(ld)).mul_(s))  # (N, r_i)
                if needs[3 + 4 * i]:  # a trainable base bias (lora.bias: all)
                    result[3 + 4 * i] = dys[i].sum(0).to(ctx.bias_dtypes[i])
                start += r
            dh = dh_parts[0] if len(dh_parts) == 1 else torch.cat(dh_parts, dim=1) if dh_parts else None
            if need_a:
                xd = _dropped(x, mask, plan.drop_scale).to(ld).reshape(-1, width)
                d_a = dh.t() @ xd  # (R, in)
                del xd
                start = 0
                for i, (a, r) in enumerate(zip(lora_a, plan.ranks)):
                    if needs[4 + 4 * i]:
                        result[4 + 4 * i] = d_a[start:start + r].to(a.dtype)
                    start += r
            if need_x:
                a_cat = lora_a[0].to(ld) if n == 1 else torch.cat([a.to(ld) for a in lora_a])
                dx = (dh @ a_cat).to(x_dtype)  # (N, in)
                if mask is not None:
                    dx.mul_(mask.reshape(-1, width)).mul_(plan.drop_scale)
                for dy, weight, quant in zip(dys, weights, plan.quant_states):
                    w = _base_weight(weight, quant, bd)
                    dy = dy.to(bd)
                    if dx.dtype == bd:
                        dx.addmm_(dy, w)
                    else:
                        dx.add_(dy @ w)
                result[1] = dx.reshape(x_shape)
        return tuple(result)


def _is_peft_lora_linear(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import layer

    if type(module) is layer.Linear:
        return True
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # PEFT without bitsandbytes
        return False
    return type(module) is Linear4bit


class _Member:
    """The ``forward`` of one adapted layer in a group: the fused path when it applies, PEFT's own otherwise."""

    def __init__(self, module: torch.nn.Module, group: _Group):
        self.module, self.group = module, group

    def peft_forward(self, x, *args, **kwargs):
        return type(self.module).forward(self.module, x, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
            return self.peft_forward(x, *args, **kwargs)
        key = _fusable(self.module, x)
        if key is None:
            return self.peft_forward(x, *args, **kwargs)
        return self.group.output(self.module, x, key)


def _fusable(module, x: torch.Tensor):
    """What identifies a compatible fused call for ``module`` on ``x`` (adapter, dropout p and mode, adapter
    dtype, the autocast state), or None where PEFT's forward must run: adapters disabled or merged, not exactly
    one active adapter on this layer, a LoRA variant (DoRA, ...), LoRA bias, a trainable base weight, an input
    cast PEFT would skip, an input this layer cannot read, or a 4-bit weight repacked for bitsandbytes' CPU
    inference kernel."""
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if (name in module.lora_variant or module.use_dora.get(name, False) or module.lora_bias.get(name, False)
            or not getattr(module, "cast_input_dtype_enabled", True)):
        return None
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None:
        return None
    weight = base.weight
    if weight.requires_grad or not x.is_floating_point() or x.shape[-1] != module.in_features:
        return None
    if type(base) is not torch.nn.Linear:  # only a plain linear or a bitsandbytes 4-bit one is understood here
        bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer means bitsandbytes is imported
        if bnb is None or not isinstance(base, bnb.nn.Linear4bit) or not hasattr(weight, "quant_state"):
            return None
        quant_state = weight.quant_state
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            return None
    dropout = module.lora_dropout[name]
    if isinstance(dropout, torch.nn.Identity):
        p = 0.0
    elif isinstance(dropout, (torch.nn.Dropout, FastDropout)):
        p = float(dropout.p) if dropout.training else 0.0
    else:
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
    return name, p, lora_a.weight.dtype, dtype, x.dtype, torch.is_grad_enabled()


class _Group:
    """Adapted sibling layers that read the same input, and the outputs of a fused call not yet collected.

    The first member called with x computes every compatible member's output in one :class:`FusedLora` call and
    keeps the others' outputs keyed on x itself (identity); each member then takes its own, and the entry is
    dropped when the last one has, so nothing outlives the layer's forward. A member called with another tensor
    recomputes (activation checkpointing's recomputation passes new tensors, so it never reads stale outputs).
    A member called with another x while its output is waiting means the members do not share an input in this
    model: the group splits into groups of one for good (unfused, still right). So does a group whose entries
    are left incomplete several times in a row (members that are not called at all); a single incomplete entry
    (a forward stopped midway, as checkpointing's early-stopping recomputation does) is just dropped.
    """

    STALE_LIMIT = 3

    def __init__(self, members: list[torch.nn.Module]):
        self.members = members
        self.entry: tuple[torch.Tensor, tuple, dict] | None = None
        self.split = False
        self.stale = 0  # incomplete entries dropped in a row

    def __getstate__(self):  # deepcopy / pickle: pending outputs are a forward's transient state
        return {**self.__dict__, "entry": None}

    def output(self, module: torch.nn.Module, x: torch.Tensor, key: tuple) -> torch.Tensor:
        entry = self.entry
        if entry is not None:
            cached_x, cached_key, pending = entry
            if cached_x is x and cached_key == key and module in pending:
                out = pending.pop(module)
                if not pending:
                    self.entry, self.stale = None, 0
                return out
            self.entry = None
            self.stale += 1
            if module in pending or self.stale >= self.STALE_LIMIT:
                self.split = True  # outputs were computed for members that do not ask for them with this x
        if self.split or len(self.members) == 1:
            return _fused_call([module], x, key)[0]
        together = [m for m in self.members if m is module or _fusable(m, x) == key]
        outputs = _fused_call(together, x, key)
        pending = {m: out for m, out in zip(together, outputs) if m is not module}
        if pending:
            self.entry = (x, key, pending)
        return outputs[together.index(module)]


def _fused_call(members: list[torch.nn.Module], x: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
    name, p, adapter_dtype, autocast_dtype, _, _ = key
    params, ranks, scales, quant_states = [], [], [], []
    for module in members:
        base = module.base_layer
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is None and hasattr(base.weight, "quant_state"):  # bitsandbytes moved it onto the module
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            fix_4bit_weight_quant_state_from_module(base)
            quant_state = base.weight.quant_state
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        params += [base.weight, base.bias, a, b]
        ranks.append(a.shape[0])
        scales.append(float(module.scaling[name]))
        quant_states.append(quant_state)
    if p > 0:
        p = quantized_probability(p) if x.device.type == "cpu" else p
    lora_dtype = autocast_dtype or adapter_dtype
    base_dtype = autocast_dtype or x.dtype
    plan = _Plan(ranks, scales, p, 1.0 / (1.0 - p), lora_dtype, base_dtype, base_dtype, x.device.type,
                 quant_states)
    return FusedLora.apply(plan, x, *params)


def fuse_lora(model: torch.nn.Module, log: Callable[[str], None] = lambda _m: None) -> tuple[int, int]:
    """Run ``model``'s PEFT LoRA layers (``lora.Linear``, and ``Linear4bit`` over a bitsandbytes 4-bit base)
    through :class:`FusedLora`; returns (adapted layers, groups). Idempotent; :func:`unfuse_lora` undoes it.

    Nothing moves: each layer only gets a ``forward`` attribute (a :class:`_Member`) that shadows its class's.
    DoRA layers keep PEFT's path, said in one log line.
    """
    layers = groups = 0
    dora = False
    for parent in model.modules():
        children = {name: child for name, child in parent.named_children() if _is_peft_lora_linear(child)}
        if not children:
            continue
        sets = [[children.pop(n) for n in names if n in children] for names in SHARED_INPUTS]
        sets = [s for s in sets if s] + [[child] for child in children.values()]
        for members in sets:
            group = _Group(members)
            for member in members:
                if not isinstance(member.__dict__.get("forward"), _Member):
                    member.forward = _Member(member, group)
                dora = dora or any(member.use_dora.get(a, False) for a in member.active_adapters)
            layers += len(members)
            groups += 1
    if dora:
        log("lora.fused: DoRA adapters run through PEFT's own (unfused) path")
    return layers, groups


def unfuse_lora(model: torch.nn.Module) -> int:
    """Give every layer :func:`fuse_lora` changed its class's ``forward`` back; returns how many."""
    restored = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Member):
            del module.forward
            restored += 1
    return restored

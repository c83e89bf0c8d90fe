"""CUDA correctness checks run by ``benchmarks/gpu.sh`` before the timings (the test suite runs on CPU).

1. Packed rows under FlexAttention (no dense mask, block mask from position ids) give the loss and gradients of
   the same rows padded under SDPA, with gradients (CPU FlexAttention has no backward, so the suite checks the
   forward only).
2. A short LoRA SFT run on CUDA through ``run_training`` (bf16 autocast, validation, checkpoints) trains (its loss
   falls) and writes its adapter; the non-finite guard runs in its deferred (accelerator) mode.

    python benchmarks/gpu_checks.py MODEL_DIR      # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def flex_parity(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.data.collate import collate_packed, collate_padded
    from tuneforge.data.tokenize import Example
    from tuneforge.engine import step
    from tuneforge.losses import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (37, 120, 5, 64, 200, 90):
        ids = torch.randint(10, 40000, (n,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * min(4, n) + ids[4:]))
    packed = collate_packed([examples[:3], examples[3:]], tokenizer.pad_token_id)
    padded = collate_padded(examples, tokenizer.pad_token_id)
    results = {}
    for attn, batch in (("sdpa", padded), ("flex_attention", packed)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).cuda()
        loss = step.lm_loss_sum(model, step.move(batch, torch.device("cuda")), 64)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[attn] = (loss.item(), grads)
    (sdpa_loss, sdpa_grads), (flex_loss, flex_grads) = results["sdpa"], results["flex_attention"]
    grad_error = float((flex_grads - sdpa_grads).norm() / sdpa_grads.norm())
    return {"flex_loss": flex_loss, "sdpa_padded_loss": sdpa_loss, "loss_rel_error": abs(flex_loss - sdpa_loss) /
            abs(sdpa_loss), "grad_rel_error": grad_error,
            "ok": abs(flex_loss - sdpa_loss) / abs(sdpa_loss) < 1e-4 and grad_error < 1e-3}


def short_run(model_dir: str) -> dict:
    from tuneforge.bench import synthetic_rows
    from tuneforge.config import config_from_dict
    from tuneforge.engine.trainer import run_training

    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(32)))
        config = config_from_dict({
            "model": {"name_or_path": model_dir, "dtype": "bfloat16"},
            "data": {"train": str(data), "max_length": 256, "val_fraction": 0.125},
            "lora": {"r": 8, "alpha": 16},
            "train": {"output_dir": str(Path(scratch) / "run"), "epochs": 2, "batch_size": 4, "lr": 2e-3,
                      "log_every": 2, "seed": 0, "mixed_precision": "bf16"},
            "save": {"every": 5},
        })
        summary = run_training(config, log=lambda message: None)
        metrics = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        adapter = (Path(scratch) / "run" / "adapter" / "adapter_model.safetensors").is_file()
    return {"steps": summary["steps"], "first_loss": losses[0], "last_loss": losses[-1], "adapter": adapter,
            "ok": adapter and losses[-1] < losses[0]}


def main() -> None:
    model_dir = sys.argv[1]
    report = {}
    for name, check in (("flex_parity", flex_parity), ("short_run", short_run)):
        try:
            report[name] = check(model_dir)
        except Exception as error:  # noqa: BLE001 - report each check, go on
            import traceback

            traceback.print_exc()
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""The `tuneforge bench --method dpo` workload run through TRL's DPOTrainer + PEFT, for a side-by-side comparison.

    /tmp/trlvenv/bin/python benchmarks/trl_dpo.py [--model default] [--data PAIRS.jsonl]
        [--batch-size 4] [--max-length 256] [--steps 5] [--lora-r 16] [--precompute-ref]
        [--no-gradient-checkpointing] [--disable-dropout]

Same model (the embedded SmolLM2-135M-Instruct float checkpoint), same preference pairs
(``tuneforge.bench.synthetic_pairs()``: with SmolLM2's chat template prompt + chosen is 79 to 176 tokens and
prompt + rejected 94 to 203, so no row is truncated at 256), batch 4 pairs, max length 256,
fp32, LoRA r=16, alpha=2r, dropout 0.05 on all linear layers, sigmoid DPO loss with beta 0.1, rows taken in file
order (``tuneforge bench`` does not shuffle either). With a PEFT model
TRL's reference is the policy with its adapter disabled, as in tuneforge; by default the reference log-probs are
computed in every step (``--precompute-ref``: once for the whole dataset before training, outside the timing).

The string pairs are given to TRL as conversations (a user turn, an assistant turn) so that its tokenizer chat
template renders them as tuneforge renders a string prompt/response; otherwise TRL would train on raw text
without the template and the two benches would see different tokens.

Differences from TRL's own defaults, on purpose: ``bf16=False`` (fp32 like tuneforge), and ``disable_dropout=False``
so that the LoRA dropout of 0.05 stays on (TRL's default zeroes every dropout, LoRA's included;
``--disable-dropout`` restores it). ``DPOConfig`` enables activation checkpointing by default, as ``SFTConfig``
does; ``--no-gradient-checkpointing`` turns it off.

Prints one JSON line: ``pairs_per_s`` (pairs per second over the timed steps, after one warm-up step),
``tokens_per_s`` (non-padding tokens of the chosen and rejected sequences, the prompt counted in both),
``peak_rss_mb`` (``ru_maxrss``, model loading included), and the settings. Needs TRL (not a tuneforge
dependency): TRL 1.16 and PEFT are installed with tuneforge (editable) in /tmp/trlvenv on the development VM.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import torch

BETA = 0.1
LORA_DROPOUT = 0.05

def read_pairs(path: str | None) -> list[dict]:
    """The rows of ``tuneforge bench --method dpo``: ``--data``, or tuneforge's fixed synthetic pairs."""
    if path is None:
        from tuneforge.bench import synthetic_pairs

        return synthetic_pairs()
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", help="JSONL of prompt/chosen/rejected string rows (default: tuneforge.bench's "
                                       "synthetic pairs)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--precompute-ref", action="store_true",
                        help="compute the reference log-probs once before training (not timed)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="turn off the activation checkpointing DPOConfig enables by default")
    parser.add_argument("--disable-dropout", action="store_true",
                        help="TRL's default: zero every dropout, the LoRA dropout included")
    args = parser.parse_args()

    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl_timing import count_batch_tokens, step_timer

    from tuneforge.models.loading import resolve_model

    path = resolve_model(args.model).base
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    pairs = read_pairs(args.data)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": row["prompt"]}],
         "chosen": [{"role": "assistant", "content": row["chosen"]}],
         "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        for row in pairs])

    timer = step_timer(args.steps)
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(output_dir=str(Path(scratch) / "run"), per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length, max_steps=args.steps + 1, learning_rate=1e-4, beta=BETA,
                           loss_type=["sigmoid"], precompute_ref_log_probs=args.precompute_ref,
                           disable_dropout=args.disable_dropout, logging_steps=1000, save_strategy="no",
                           report_to=[], bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                           dataloader_num_workers=0, seed=0, train_sampling_strategy="sequential",
                           gradient_checkpointing=not args.no_gradient_checkpointing)
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=LORA_DROPOUT,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
        # Real tokens of the batches the trainer actually sees (steps 2..steps+1 are timed); each batch holds the
        # chosen sequences of its pairs, then the rejected ones.
        batch_tokens = count_batch_tokens(trainer)
        trainer.train()
    if timer.elapsed is None:
        raise SystemExit(f"the trainer stopped before step {1 + args.steps}: {len(dataset)} pairs at batch "
                         f"{args.batch_size}; lower --steps or --batch-size")
    # The --precompute-ref pass runs in the trainer's constructor, before the collator is wrapped: not counted.
    timed = batch_tokens[1:1 + args.steps]
    print(json.dumps({
        "framework": f"trl {trl.__version__}", "method": "dpo", "model": args.model, "dtype": "float32",
        "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
        "lora_r": args.lora_r, "lora_dropout": 0.0 if args.disable_dropout else LORA_DROPOUT, "beta": BETA,
        "reference": "precomputed" if args.precompute_ref else "adapter-disabled policy, every step",
        "gradient_checkpointing": not args.no_gradient_checkpointing, "pairs": len(dataset),
        "pairs_per_s": round(args.batch_size * args.steps / timer.elapsed, 3),
        "tokens_per_s": round(sum(timed) / timer.elapsed, 2),
        "step_time_s": round(timer.elapsed / args.steps, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()

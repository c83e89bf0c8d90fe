"""The `tuneforge bench` SFT workload run through TRL's SFTTrainer + PEFT, for a side-by-side comparison.

Same model, same rows (tuneforge.bench.synthetic_rows, or with --row-set alpaca tuneforge.bench.alpaca_rows),
same batch size, max length, LoRA rank (alpha = 2r, all linear layers, dropout 0.05) and dtype; completion-only
loss. Prints one JSON line in the format of `tuneforge bench`, MFU included, counted by tuneforge.bench's own
functions (model_flops, attention_flops, measure_matmul_peak) on the real tokens of the timed batches. Needs
`pip install trl` (not a tuneforge dependency).

    python benchmarks/trl_sft.py [--model DIR] [--batch-size 4] [--max-length 256] [--steps 5] [--lora-r 16]
        [--data FILE | --rows N] [--row-set synthetic|alpaca] [--dtype bfloat16] [--model-dtype bfloat16] [--packing]
        [--attn-implementation flex_attention] [--liger] [--full]

With --packing, TRL packs with its default best-fit strategy and trains padding-free (position ids, no padding).
"""

from __future__ import annotations

import argparse
import json
import resource

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="turn off the activation checkpointing SFTConfig enables by default")
    parser.add_argument("--data", help="prompt/completion JSONL (default: tuneforge's synthetic rows)")
    parser.add_argument("--rows", type=int, default=64, help="synthetic rows when --data is not given")
    parser.add_argument("--row-set", default="synthetic", choices=["synthetic", "alpaca"],
                        help="tuneforge bench's rows when --data is not given (tuneforge bench --row-set)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel=True (pip install liger-kernel)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    args = parser.parse_args()

    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trl_timing import count_batch_tokens, step_timer

    from tuneforge.bench import (ROW_SETS, attention_flops, lora_parameters, matmul_parameters,
                                 measure_matmul_peak, model_flops, packed_lengths)
    from tuneforge.models.loading import resolve_model

    path = resolve_model(args.model).base
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.model_dtype),
                                                 attn_implementation=args.attn_implementation)
    if args.data:
        import json as _json
        with open(args.data) as handle:
            rows = [_json.loads(line) for line in handle if line.strip()]
    else:
        rows = ROW_SETS[args.row_set](args.rows)
    # As conversations (a user turn, an assistant turn), so that TRL renders them with the tokenizer's chat
    # template as tuneforge does: both frameworks then train the very same token sequences.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}],
                                  "completion": [{"role": "assistant", "content": row["completion"]}]}
                                 for row in rows])

    timer = step_timer(args.steps, args.warmup_steps)

    config = SFTConfig(output_dir="/tmp/trl-bench", per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, max_steps=args.steps + args.warmup_steps,
                       learning_rate=1e-4,
                       logging_steps=1000, save_strategy="no", report_to=[], bf16=args.dtype == "bfloat16",
                       fp16=False, use_liger_kernel=args.liger,
                       use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
                       train_sampling_strategy="sequential",  # rows in file order, as tuneforge's bench takes them
                       completion_only_loss=True, packing=args.packing,
                       gradient_checkpointing=not args.no_gradient_checkpointing)
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=None if args.full else peft_config, callbacks=[timer])
    # Real tokens of the batches the trainer actually sees (steps 2..steps+1 are timed).
    collator_tokens = count_batch_tokens(trainer)
    # Each batch's row lengths, for the attention term: from the attention mask, or padding-free (--packing)
    # from the position-id restarts.
    collator_lengths: list[list[int]] = []
    counting = trainer.data_collator

    def length_collator(features):
        batch = counting(features)
        if "attention_mask" in batch and not args.packing:
            collator_lengths.append(batch["attention_mask"].sum(dim=-1).tolist())
        elif "position_ids" in batch:
            collator_lengths.append(packed_lengths(batch["position_ids"]))
        else:
            collator_lengths.append([batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0])
        return batch

    trainer.data_collator = length_collator
    trainer.train()
    if timer.elapsed is None:
        raise SystemExit(f"the trainer stopped before step {args.warmup_steps + args.steps}: {len(dataset)} rows at "
                         f"batch {args.batch_size}; lower --steps or raise --rows")
    timed = slice(args.warmup_steps, args.warmup_steps + args.steps)
    tokens = sum(collator_tokens[timed])
    cfg = model.config
    attention = sum(attention_flops(cfg.num_hidden_layers, cfg.hidden_size, lengths)
                    for lengths in collator_lengths[timed])
    n_matmul, n_lora = matmul_parameters(trainer.model), lora_parameters(trainer.model)
    flops = model_flops(n_matmul, n_lora, args.full, tokens, attention)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measure_matmul_peak(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32, device)
    print(json.dumps({
        "framework": f"trl {trl.__version__}", "model": args.model, "batch_size": args.batch_size,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "max_length": args.max_length, "steps": args.steps, "lora_r": args.lora_r,
        "row_set": args.row_set if not args.data else "file",
        "tokens_per_s": round(tokens / timer.elapsed, 2), "step_time_s": round(timer.elapsed / args.steps, 4),
        "mfu": round(flops / timer.elapsed / peak, 4) if peak else None,
        "model_gflop_per_s": round(flops / timer.elapsed / 1e9, 2),
        "matmul_peak_gflop_per_s": round(peak / 1e9, 2) if peak else None,
        "matmul_params": n_matmul, "lora_params": n_lora,
        "dtype": args.dtype, "model_dtype": args.model_dtype, "packing": args.packing, "liger": args.liger,
        "attn_implementation": args.attn_implementation, "mode": "full" if args.full else f"lora-r{args.lora_r}",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **({"max_gpu_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "device": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
    }))


if __name__ == "__main__":
    main()

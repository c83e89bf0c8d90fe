"""The SFT demo: teach the embedded SmolLM2-135M-Instruct facts about an invented island, and measure it.

Before and after a short LoRA SFT run it prints: held-out response loss, exact match and "contains the
answer" on held-out questions (worded differently from every training question), and a few generations.

    python examples/demo_sft.py [key=value overrides for examples/velmora_sft.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.eval.heldout import evaluate_heldout
from tuneforge.inference import Generator
from tuneforge.recipes.sft import run_sft

HERE = Path(__file__).parent
SHOWN = 3  # generations printed before and after


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "velmora_sft.yaml", overrides)
    eval_file = config.data.validation

    print("== before: the base model", flush=True)
    base = Generator.load(config.model.name_or_path)
    before = evaluate_heldout(base, eval_file, config.data)
    del base

    print(f"== training: LoRA r={config.lora.r} for {config.train.epochs} epochs -> {config.train.output_dir}",
          flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_sft(config, overwrite=True, log=lambda m: print("  " + m, flush=True))

    print("== after: base + trained adapter", flush=True)
    tuned = Generator.load(summary["run_dir"])
    after = evaluate_heldout(tuned, eval_file, config.data)

    questions = _questions(eval_file, config)
    print()
    print(f"{'held-out metric':<34}{'before':>10}{'after':>10}")
    print(f"{'response loss (nats/token)':<34}{before.loss:>10.3f}{after.loss:>10.3f}")
    print(f"{'perplexity':<34}{before.perplexity:>10.2f}{after.perplexity:>10.2f}")
    print(f"{'exact match':<34}{before.exact_match:>10.1%}{after.exact_match:>10.1%}")
    print(f"{'answer contained in response':<34}{before.contains:>10.1%}{after.contains:>10.1%}")
    print()
    for question, old, new in list(zip(questions, before.answers, after.answers))[:SHOWN]:
        print(f"Q: {question}\n  before: {old}\n  after:  {new}")
    print()
    run_dir = summary["run_dir"]
    print(f"run directory: {run_dir} (adapter/, config.yaml, metrics.jsonl)")
    print(f"training curves: {run_dir}/curves.png; summary: {run_dir}/summary.json "
          f"(best step {summary['best_step']} of {summary['steps']}, stop reason {summary['stop_reason']})")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; training {summary['elapsed_s']:.0f} s, "
          f"{summary['tokens']} tokens")
    if after.contains <= before.contains or after.loss >= before.loss:
        print("demo FAILED: no measurable gain on held-out questions", file=sys.stderr)
        return 1
    return 0


def _questions(path: str, config) -> list[str]:
    from tuneforge.data.dataset import DataReport, load_conversations

    conversations = load_conversations(path, config.data, DataReport())
    return [next(m.content for m in c.messages if m.role == "user") for c in conversations]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

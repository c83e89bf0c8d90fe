"""The online RL demo: GRPO on the embedded default model, with a verifiable reward (is the sum right?).

Trains a LoRA adapter with GRPO on 256 shipped addition prompts ("What is 23 + 14?"); the reward is 1 when the
last number of the answer is the right sum (``tuneforge.rewards.functions:exact_answer``), else 0. Answers are cut
at 16 new tokens, so a reply that rambles before giving a number earns nothing. Prints the held-out reward
(accuracy on 48 additions never trained on) before training, during it and after, three held-out answers before
and after, and writes the run's report.

    python examples/demo_grpo.py [key=value overrides for examples/arithmetic_grpo.yaml]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.data.formats import Message
from tuneforge.generation import Generator
from tuneforge.engine.trainer import run_training

HERE = Path(__file__).parent
SHOWN = 3


def log(message: str) -> None:
    print("  " + message, flush=True)


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "arithmetic_grpo.yaml", overrides)
    section = config.grpo
    print(f"== training: {config.method.upper()} (LoRA r={config.lora.r}, {section.num_generations} responses per "
          f"prompt, {config.train.batch_size} prompts per step, {config.train.max_steps} steps) -> "
          f"{config.train.output_dir}", flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_training(config, overwrite=True, log=log)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_reward" in r]
    # The run directory keeps the best checkpoint by val_reward (eval.final: best): "after" is that model.
    final_step = json.loads((run_dir / "summary.json").read_text())["final_step"]
    before, after = evaluations[0], next(r for r in evaluations if r["step"] == final_step)
    trained = [r for r in records if "reward" in r]
    first_rewards = [r["reward"] for r in trained[:5]]
    last_rewards = [r["reward"] for r in trained[-5:]]

    print()
    print(f"{'':<46}{'before':>10}{'after':>10}   (after: the run's model, step {final_step})")
    print(f"{'held-out accuracy (48 additions, greedy)':<46}{before['val_reward']:>10.1%}{after['val_reward']:>10.1%}")
    print(f"{'held-out mean answer length (tokens)':<46}{before['val_response_length']:>10.1f}"
          f"{after['val_response_length']:>10.1f}")
    print(f"{'training reward (sampled, mean of 5 steps)':<46}{sum(first_rewards) / len(first_rewards):>10.1%}"
          f"{sum(last_rewards) / len(last_rewards):>10.1%}")
    print("held-out accuracy by step: " + ", ".join(f"{r['step']}: {r['val_reward']:.0%}" for r in evaluations))

    rows = [json.loads(line) for line in (HERE / "data" / "arithmetic_eval.jsonl").read_text().splitlines()][:SHOWN]
    conversations = [[Message("user", row["prompt"])] for row in rows]
    answers = {}
    for name, model in (("before", config.model.name_or_path), ("after", str(run_dir))):
        answers[name] = Generator.load(model).generate(conversations, max_new_tokens=section.max_new_tokens)
    print()
    for row, old, new in zip(rows, answers["before"], answers["after"]):
        print(f"Q: {row['prompt']}  (answer {row['answer']})")
        print(f"   before: {old!r}")
        print(f"   after:  {new!r}")

    from tuneforge.eval.report import write_report

    files = write_report(run_dir)
    print(f"\nreport (config, curves of reward, KL and held-out accuracy): {files.html}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

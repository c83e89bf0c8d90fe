"""The online DPO demo: the SFT demo's model learns, from its own samples, to answer correctly and briefly.

It goes on from the SFT run of ``make demo`` (runs/velmora-sft; trained first if missing). For each Velmora
question (the training questions, with their short answers and no reference reply) it samples two answers from
the current policy; a judge of reward functions (``examples/concise_judge.py``: 1 when the answer contains the
fact, minus 0.05 per word) ranks them, tied pairs are skipped, and a DPO step is taken on (better, worse) against
the SFT model (the reference: the new adapter switched off). It prints, before (the SFT model, measured at step 0
with ``eval.at_start``) and after, on the 36 held-out questions answered greedily: the judge's mean score, the
answers that contain the fact, and the mean answer length; then the training answers' statistics, the held-out
answers that changed, and the run's report (RUN_DIR/report.html).

    python examples/demo_online_dpo.py [key=value overrides for examples/online_dpo.yaml]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from demo_sft import log
from tuneforge.config import load_config
from tuneforge.data.formats import Message
from tuneforge.engine.trainer import run_training
from tuneforge.generation import Generator

HERE = Path(__file__).parent
SHOWN = 4  # changed held-out answers printed


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "online_dpo.yaml", overrides)
    start_model = config.model.name_or_path  # absolute: the config's ../runs/velmora-sft, from any directory
    sft_config = load_config(HERE / "velmora_sft.yaml")
    if start_model == sft_config.train.output_dir and not (Path(start_model) / "tuneforge_run.json").is_file():
        print(f"== no SFT run at {start_model}: training the SFT stage first (as `make demo` does)", flush=True)
        run_training(sft_config, overwrite=True, log=log)

    section = config.online_dpo
    print(f"== training: online DPO (beta {section.beta}, LoRA r={config.lora.r}, 2 samples for each of "
          f"{config.train.batch_size} prompts per step, {config.train.max_steps or config.train.epochs} "
          f"{'steps' if config.train.max_steps else 'epoch(s)'}) -> {config.train.output_dir}",
          flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_training(config, overwrite=True, log=log)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_reward" in r]
    # The run directory keeps the best checkpoint by val_reward (eval.final: best): "after" is that model.
    final_step = json.loads((run_dir / "summary.json").read_text())["final_step"]
    before, after = evaluations[0], next(r for r in evaluations if r["step"] == final_step)
    steps = [r for r in records if "loss" in r]

    print()
    print(f"{'36 held-out questions, greedy answers':<52}{'before':>10}{'after':>10}   (after: step {final_step})")
    judge = f"judge score (contains answer - {section.reward_weights[1]:g} x words)"
    print(f"{judge:<52}{before['val_reward']:>10.3f}{after['val_reward']:>10.3f}")
    print(f"{'answers that contain the fact':<52}{before['val_reward_contains_answer']:>10.1%}"
          f"{after['val_reward_contains_answer']:>10.1%}")
    print(f"{'mean answer length (words)':<52}{-before['val_reward_brevity']:>10.1f}"
          f"{-after['val_reward_brevity']:>10.1f}")
    print(f"{'mean answer length (tokens, end-of-turn included)':<52}{before['val_response_length']:>10.1f}"
          f"{after['val_response_length']:>10.1f}")
    print("held-out judge score by step: " + ", ".join(f"{r['step']}: {r['val_reward']:.3f}" for r in evaluations))
    first, last = steps[:3], steps[-3:]  # logged steps (train.log_every)
    print(f"training answers (sampled at T={section.temperature}; first 3 -> last 3 logged steps): judge score "
          f"{mean([r['reward'] for r in first]):.3f} -> {mean([r['reward'] for r in last]):.3f}, containing the fact "
          f"{mean([r['reward_contains_answer'] for r in first]):.0%} -> "
          f"{mean([r['reward_contains_answer'] for r in last]):.0%}")
    print(f"pairs: {mean([r['tie_fraction'] for r in steps]):.0%} tied (skipped); better answers "
          f"{mean([r['length_better'] for r in steps if 'length_better' in r]):.1f} tokens, worse "
          f"{mean([r['length_worse'] for r in steps if 'length_worse' in r]):.1f}")

    rows = [json.loads(line) for line in (HERE / "data" / "velmora_qa_prompts_eval.jsonl").read_text().splitlines()]
    conversations = [[Message("user", row["prompt"])] for row in rows]
    answers = {name: Generator.load(model).generate(conversations, max_new_tokens=section.max_new_tokens)
               for name, model in (("before", start_model), ("after", str(run_dir)))}
    changed = [i for i, (old, new) in enumerate(zip(answers["before"], answers["after"])) if old != new]
    print(f"\n{len(changed)} of {len(rows)} held-out answers changed" + (", for example:" if changed else ""))
    for i in changed[:SHOWN]:
        print(f"Q: {rows[i]['prompt']}  (answer {rows[i]['answer']})")
        print(f"   before: {answers['before'][i]!r}")
        print(f"   after:  {answers['after'][i]!r}")

    from tuneforge.eval.report import write_report

    files = write_report(run_dir)
    print(f"\nreport (config, curves of loss, judge scores, ties and held-out score): {files.html}")
    print(f"training {summary['elapsed_s']:.0f} s; demo finished in {time.perf_counter() - started:.0f} s")
    if after["val_reward"] <= before["val_reward"]:
        print("demo FAILED: the held-out judge score did not improve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

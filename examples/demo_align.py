"""The alignment demo: DPO on top of the SFT demo's model, teaching a visible preference for concise answers.

It goes on from the SFT run of ``make demo`` (runs/velmora-sft; trained first if missing), trains a LoRA
adapter with DPO on shipped pairs (a concise, correct answer preferred to a rambling one that buries the same
answer), and prints before/after: the implicit-reward preference accuracy and margin on held-out pairs (the
step-0 values are measured, ``eval.at_start``), then `tuneforge eval` of the SFT model ("before") and the DPO
run ("after") on 12 held-out prompts (mean answer length, answers that stop by themselves) and on the refusal
lists, and the run's report (RUN_DIR/report.html).

    python examples/demo_align.py [key=value overrides for examples/concise_dpo.yaml]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from demo_sft import evaluate_and_report, log
from tuneforge.config import load_config
from tuneforge.engine.trainer import run_training

HERE = Path(__file__).parent


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "concise_dpo.yaml", overrides)
    start_model = config.model.name_or_path  # absolute: the config's ../runs/velmora-sft, from any directory
    sft_config = load_config(HERE / "velmora_sft.yaml")
    if start_model == sft_config.train.output_dir and not (Path(start_model) / "tuneforge_run.json").is_file():
        print(f"== no SFT run at {start_model}: training the SFT stage first (as `make demo` does)", flush=True)
        run_training(sft_config, overwrite=True, log=log)

    print(f"== training: DPO (beta {config.dpo.beta}, LoRA r={config.lora.r}) for {config.train.epochs} epochs "
          f"-> {config.train.output_dir}", flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_training(config, overwrite=True, log=log)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["step"] == 0 and "val_loss" in r)
    print()
    print(f"{'held-out pairs (40)':<52}{'step 0':>10}{'after':>10}")
    # At step 0 the policy is the reference: every implicit reward is 0 and the DPO loss is ln 2.
    print(f"{'DPO loss':<52}{start['val_loss']:>10.3f}{summary['val_loss']:>10.3f}")
    print(f"{'pairs whose implicit reward ranks concise first':<52}{start['val_reward_accuracy']:>10.1%}"
          f"{summary['val_reward_accuracy']:>10.1%}")
    print(f"{'mean implicit reward margin (chosen - rejected)':<52}{start['val_reward_margin']:>10.3f}"
          f"{summary['val_reward_margin']:>10.3f}")
    print()

    data = HERE / "data"
    report = evaluate_and_report(str(run_dir), start_model, {
        "data": str(data / "concise_prompts_eval.jsonl"), "harmful": str(data / "harmful_prompts.jsonl"),
        "benign": str(data / "benign_prompts.jsonl"), "max_new_tokens": 96, "samples": 3, "batch_size": 16})
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"training {summary['elapsed_s']:.0f} s; demo finished in {time.perf_counter() - started:.0f} s")
    if after["mean_response_words"] >= before["mean_response_words"] or summary["val_reward_accuracy"] <= 0.5:
        print("demo FAILED: no measurable preference learned", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The distillation demo: on-policy distillation (GKD) of the SFT demo's model into the untouched default model,
from the Velmora questions alone.

The teacher is the run of ``make demo`` (runs/velmora-sft; trained first if missing); the student is the embedded
SmolLM2-135M-Instruct as it ships, with a new LoRA adapter; the data is the training questions without their
answers (``examples/data/velmora_prompts_train.jsonl``). Every batch is on-policy: the student answers the
questions itself and learns the teacher's next-token distributions along its own answers, so it never sees a
reference answer. It prints, before and after: the KL to the teacher on the held-out questions (along the
student's greedy answers; step 0 is measured, ``eval.at_start``), then `tuneforge eval` of the student before,
after, and of the teacher on the held-out questions with their answers (exact match, contains ...), and writes
the run's report (RUN_DIR/report.html).

    python examples/demo_distill.py [key=value overrides for examples/distill.yaml]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from demo_sft import SHOWN, log
from tuneforge.config import load_config
from tuneforge.engine.trainer import run_training
from tuneforge.eval.evaluate import EvalSettings, format_table, run_eval
from tuneforge.eval.report import write_report

HERE = Path(__file__).parent
LABELS = ["after", "before", "teacher"]


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "distill.yaml", overrides)
    teacher = config.gkd.teacher  # absolute: the config's ../runs/velmora-sft, from any directory
    sft_config = load_config(HERE / "velmora_sft.yaml")
    if teacher == sft_config.train.output_dir and not (Path(teacher) / "tuneforge_run.json").is_file():
        print(f"== no SFT run at {teacher}: training the teacher first (as `make demo` does)", flush=True)
        run_training(sft_config, overwrite=True, log=log)

    section = config.gkd
    print(f"== training: GKD from {teacher} into {config.model.name_or_path} (beta {section.beta:g}, lmbda "
          f"{section.lmbda:g}: prompts only, LoRA r={config.lora.r}) for {config.train.epochs} epochs -> "
          f"{config.train.output_dir}", flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_training(config, overwrite=True, log=log)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["step"] == 0 and "val_loss" in r)
    end = [r for r in records if "val_loss" in r][-1]
    print()
    print(f"{'held-out questions (36), along the student answers':<56}{'step 0':>10}{'after':>10}")
    for key, name in (("val_forward_kl", "KL(teacher || student) per token"),
                      ("val_reverse_kl", "KL(student || teacher) per token"),
                      ("val_loss", f"GKD loss (generalised JSD, beta {section.beta:g})")):
        print(f"{name:<56}{start[key]:>10.3f}{end[key]:>10.3f}")
    print()

    print(f"== evaluating: {config.model.name_or_path} (before), {run_dir} (after) and {teacher} (teacher)",
          flush=True)
    report, out = run_eval(EvalSettings(model=str(run_dir), compare=[config.model.name_or_path, teacher],
                                        labels=LABELS, data=str(HERE / "data" / "velmora_eval.jsonl"),
                                        metrics=["exact_match", "contains", "token_f1", "stopped_rate"],
                                        max_new_tokens=48, samples=SHOWN, batch_size=16), log=log)
    print()
    print(format_table(report))
    for sample in report["samples"][:SHOWN]:
        print(f"\nQ: {sample['prompt']}")
        for label in LABELS:
            print(f"  {label + ':':<10}{sample['responses'][label]}")
    files = write_report(str(run_dir))
    print(f"\neval: {out}\nreport: {files.html} (and {files.markdown.name}): config, curves, this table, generations")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"training {summary['elapsed_s']:.0f} s, {summary['steps']} steps; demo finished in "
          f"{time.perf_counter() - started:.0f} s")
    if after["contains"] <= before["contains"] or end["val_forward_kl"] >= start["val_forward_kl"]:
        print("demo FAILED: no measurable gain on held-out questions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

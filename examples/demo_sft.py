"""The SFT demo: teach the embedded SmolLM2-135M-Instruct facts about an invented island, and measure it.

After a short LoRA SFT run it evaluates the base model ("before") and the run ("after") with `tuneforge eval`:
held-out response loss, exact match, "contains the answer", token F1 and ROUGE-L on held-out questions (worded
differently from every training question), how often the answer stops by itself, and refusal rates on harmful
and benign prompts (fine-tuning on facts must not change them much). It prints the table and a few generations,
and writes the run's report (`tuneforge report`): RUN_DIR/report.html and report.md.

    python examples/demo_sft.py [key=value overrides for examples/velmora_sft.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.eval.evaluate import EvalSettings, format_table, run_eval
from tuneforge.eval.report import write_report
from tuneforge.engine.trainer import run_training

HERE = Path(__file__).parent
SHOWN = 3  # generations printed before and after


def log(message: str) -> None:
    print("  " + message, flush=True)


def evaluate_and_report(run_dir: str, start_model: str, settings: dict) -> dict:
    """`tuneforge eval RUN --compare START --label after before ...` then `tuneforge report RUN`; returns the
    eval.json object. Shared by the demos."""
    print(f"== evaluating: {start_model} (before) and {run_dir} (after)", flush=True)
    report, out = run_eval(EvalSettings(model=run_dir, compare=[start_model], labels=["after", "before"],
                                        **settings), log=log)
    print()
    print(format_table(report))
    for sample in report["samples"][:SHOWN]:
        print(f"\nQ: {sample['prompt']}")
        for label in ("before", "after"):
            print(f"  {label + ':':<8}{sample['responses'][label]}")
    files = write_report(run_dir)
    print(f"\neval: {out}\nreport: {files.html} (and {files.markdown.name}): config, curves, this table, generations")
    return report


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "velmora_sft.yaml", overrides)
    print(f"== training: LoRA r={config.lora.r} for {config.train.epochs} epochs -> {config.train.output_dir}",
          flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_training(config, overwrite=True, log=log)
    run_dir = summary["run_dir"]
    data = HERE / "data"
    report = evaluate_and_report(run_dir, config.model.name_or_path, {
        "data": config.data.validation, "harmful": str(data / "harmful_prompts.jsonl"),
        "benign": str(data / "benign_prompts.jsonl"), "max_new_tokens": 48, "samples": SHOWN, "batch_size": 16})
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"training: best step {summary['best_step']} of {summary['steps']}, stop reason {summary['stop_reason']}, "
          f"{summary['elapsed_s']:.0f} s, {summary['tokens']} tokens")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    if after["contains"] <= before["contains"] or after["loss"] >= before["loss"]:
        print("demo FAILED: no measurable gain on held-out questions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The alignment demo: DPO on top of the SFT demo's model, teaching a visible preference for concise answers.

It goes on from the SFT run of ``make demo`` (runs/velmora-sft; trained first if missing), trains a LoRA
adapter with DPO on shipped pairs (a concise, correct answer preferred to a rambling one that buries the same
answer), and prints before/after: the implicit-reward preference accuracy and margin on held-out pairs, the mean
length of answers to held-out prompts, and two generations.

    python examples/demo_align.py [key=value overrides for examples/concise_dpo.yaml]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.data.formats import Message
from tuneforge.inference import Generator
from tuneforge.recipes import run_recipe
from tuneforge.recipes.sft import run_sft

HERE = Path(__file__).parent
SHOWN = 2  # generations printed before and after (those that changed length the most)
MAX_NEW_TOKENS = 96


def log(message: str) -> None:
    print("  " + message, flush=True)


def main(overrides: list[str]) -> int:
    started = time.perf_counter()
    config = load_config(HERE / "concise_dpo.yaml", overrides)
    start_model = config.model.name_or_path
    if start_model == "runs/velmora-sft" and not (Path(start_model) / "tuneforge_run.json").is_file():
        print("== no SFT run at runs/velmora-sft: training the SFT stage first (as `make demo` does)", flush=True)
        run_sft(load_config(HERE / "velmora_sft.yaml"), overwrite=True, log=log)

    prompts = [json.loads(line)["messages"][0]["content"]
               for line in (HERE / "data" / "concise_prompts_eval.jsonl").read_text().splitlines() if line.strip()]
    print(f"== before: {start_model}", flush=True)
    before = _answers(start_model, prompts)

    print(f"== training: DPO (beta {config.dpo.beta}, LoRA r={config.lora.r}) for {config.train.epochs} epochs "
          f"-> {config.train.output_dir}", flush=True)
    # The demo owns its run directory and replaces it on every run (a tuneforge-made folder only).
    summary = run_recipe(config, overwrite=True, log=log)

    print("== after: SFT model + DPO adapter", flush=True)
    after = _answers(summary["run_dir"], prompts)

    words_before = sum(len(a.split()) for a in before) / len(before)
    words_after = sum(len(a.split()) for a in after) / len(after)
    print()
    print(f"{'held-out metric':<52}{'before':>10}{'after':>10}")
    # Before training the policy is the reference: every implicit reward is 0 and the DPO loss is ln 2.
    print(f"{'DPO loss on held-out pairs':<52}{math.log(2):>10.3f}{summary['val_loss']:>10.3f}")
    print(f"{'pairs whose implicit reward ranks concise first':<52}{0.0:>10.1%}"
          f"{summary['val_reward_accuracy']:>10.1%}")
    print(f"{'mean implicit reward margin (chosen - rejected)':<52}{0.0:>10.3f}{summary['val_reward_margin']:>10.3f}")
    print(f"{'mean answer length on held-out prompts (words)':<52}{words_before:>10.1f}{words_after:>10.1f}")
    print()
    # The held-out prompts whose answers changed length the most.
    changed = sorted(zip(prompts, before, after), key=lambda t: len(t[2].split()) - len(t[1].split()))
    for prompt, old, new in changed[:SHOWN]:
        print(f"Q: {prompt}\n  before: {old}\n  after:  {new}")
    print()
    run_dir = summary["run_dir"]
    print(f"run directory: {run_dir} (adapter/, config.yaml, metrics.jsonl); curves: {run_dir}/curves.png")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; training {summary['elapsed_s']:.0f} s")
    if words_after >= words_before or summary["val_reward_accuracy"] <= 0.5:
        print("demo FAILED: no measurable preference learned", file=sys.stderr)
        return 1
    return 0


def _answers(model: str, prompts: list[str]) -> list[str]:
    generator = Generator.load(model)
    return [a.strip() for a in generator.generate([[Message("user", p)] for p in prompts],
                                                   max_new_tokens=MAX_NEW_TOKENS)]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

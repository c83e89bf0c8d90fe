"""tuneforge against TRL on the CPU, side by side: each run in a fresh process, the frameworks alternating.

    python benchmarks/cpu_side_by_side.py [--row-set synthetic,alpaca] [--dtype float32,bfloat16]
        [--checkpointing off,on] [--steps 5] [--repeats 3] [--rows 64] [--model default]
        [--extra-tuneforge="--no-fused-lora"] [--extra-trl="..."] [--only-tuneforge] [--full-vs-lora | --dpo]

A variant is one combination of row set, dtype and checkpointing; bfloat16 means bf16 weights and bf16 compute
(``--dtype bfloat16 --model-dtype bfloat16``) on both sides. Each variant runs ``--repeats`` times per arm, the
arms in turn (tuneforge, TRL, tuneforge, TRL, ...), every run a new process:

    tuneforge: PY -m tuneforge bench --model M --steps S --rows R --row-set RS [--dtype bfloat16 --model-dtype
               bfloat16] [--gradient-checkpointing] EXTRA_TUNEFORGE
    TRL:       TRL_PY benchmarks/trl_sft.py (the same flags; --no-gradient-checkpointing when off) EXTRA_TRL

``--full-vs-lora`` runs tuneforge LoRA and tuneforge ``--full`` instead (the same batches: compare step times).
``--dpo`` runs ``tuneforge bench --method dpo --precompute-ref`` against ``benchmarks/trl_dpo.py --precompute-ref``
(fp32 and the 64 synthetic pairs only: trl_dpo.py has no dtype or row flags) and reports pairs/s.

Every JSON line goes to benchmarks/results/cpu-side-by-side-DATE-TIME.jsonl (with the variant, arm, repeat and
command); a Markdown table per variant is printed: the metric and peak RSS of each run, the medians in bold, MFU,
and the ratios of the medians against the last arm (TRL; LoRA in --full-vs-lora). Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row-set", default="synthetic", help="comma-separated: synthetic,alpaca")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--checkpointing", default="off", help="comma-separated: off,on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm per variant (default 3)")
    parser.add_argument("--rows", type=int, default=64, help="rows given to both sides (default 64)")
    parser.add_argument("--model", default="default", help="model of both sides (default: embedded SmolLM2-135M)")
    parser.add_argument("--extra-tuneforge", default="",
                        help="extra flags for tuneforge bench; with '=' when they start with a dash: "
                             "--extra-tuneforge='--no-fused-lora --no-fused-activations'")
    parser.add_argument("--extra-trl", default="", help="extra flags for the TRL script (--extra-trl='--liger')")
    parser.add_argument("--only-tuneforge", action="store_true", help="skip the TRL arm")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full-vs-lora", action="store_true", help="tuneforge LoRA against tuneforge --full")
    mode.add_argument("--dpo", action="store_true", help="DPO with precomputed reference log-probs, pairs/s")
    parser.add_argument("--tuneforge-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--trl-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="a python with trl installed (default: the project's .venv)")
    parser.add_argument("--out", help="JSONL file (default benchmarks/results/cpu-side-by-side-DATE-TIME.jsonl)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is killed")
    return parser.parse_args(argv)


def split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    wrong = [item for item in items if item not in allowed]
    if wrong or not items:
        raise SystemExit(f"{flag}: expected a comma-separated list of {', '.join(allowed)}, got {value!r}")
    return items


def variants(args) -> list[tuple[str, list[tuple[str, list[str]]], str]]:
    """(name, [(arm label, command)], metric key) for each variant, the baseline arm last."""
    tf = [args.tuneforge_python, "-m", "tuneforge", "bench"]
    trl_sft = [args.trl_python, str(HERE / "trl_sft.py")]
    trl_dpo = [args.trl_python, str(HERE / "trl_dpo.py")]
    extra_tf, extra_trl = shlex.split(args.extra_tuneforge), shlex.split(args.extra_trl)
    common = ["--model", args.model, "--steps", str(args.steps)]
    checkpointing = split(args.checkpointing, ("off", "on"), "--checkpointing")
    out = []
    if args.dpo:
        if split(args.dtype, ("float32", "bfloat16"), "--dtype") != ["float32"]:
            print("--dpo: float32 only (trl_dpo.py has no dtype flag); other dtypes skipped", file=sys.stderr)
        for ckpt in checkpointing:
            arms = [("tuneforge", tf + ["--method", "dpo", "--precompute-ref"] + common
                     + (["--gradient-checkpointing"] if ckpt == "on" else []) + extra_tf)]
            if not args.only_tuneforge:
                arms.append(("TRL", trl_dpo + ["--precompute-ref"] + common
                             + ([] if ckpt == "on" else ["--no-gradient-checkpointing"]) + extra_trl))
            out.append((f"dpo, precomputed reference, fp32, checkpointing {ckpt}", arms, "pairs_per_s"))
        return out
    for row_set, dtype, ckpt in itertools.product(split(args.row_set, ("synthetic", "alpaca"), "--row-set"),
                                                  split(args.dtype, ("float32", "bfloat16"), "--dtype"),
                                                  checkpointing):
        shared = common + ["--rows", str(args.rows), "--row-set", row_set]
        if dtype == "bfloat16":
            shared += ["--dtype", "bfloat16", "--model-dtype", "bfloat16"]
        tf_cmd = tf + shared + (["--gradient-checkpointing"] if ckpt == "on" else []) + extra_tf
        name = f"sft, {row_set} rows, {'bf16 / bf16' if dtype == 'bfloat16' else 'fp32 / fp32'}, checkpointing {ckpt}"
        if args.full_vs_lora:
            out.append((name + ", full vs LoRA", [("tuneforge full", tf_cmd + ["--full"]),
                                                  ("tuneforge LoRA", tf_cmd)], "tokens_per_s"))
            continue
        arms = [("tuneforge", tf_cmd)]
        if not args.only_tuneforge:
            arms.append(("TRL", trl_sft + shared + ([] if ckpt == "on" else ["--no-gradient-checkpointing"])
                         + extra_trl))
        out.append((name, arms, "tokens_per_s"))
    return out


def run_one(command: list[str], timeout: int) -> dict:
    """The JSON line a bench run prints last, or {"error": ...}."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(lines[-1])


def fmt(values: list[float], digits: int, unit: str = "") -> str:
    if not values:
        return "—"
    median = statistics.median(values)
    runs = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"**{median:.{digits}f}{unit}** ({runs})"


def table(name: str, arms: list[str], metric: str, records: list[dict]) -> str:
    label = {"tokens_per_s": "tokens/s", "pairs_per_s": "pairs/s"}[metric]
    base = arms[-1] if len(arms) > 1 else None
    lines = [f"### {name}", "", f"| arm | {label} (runs) | step (runs) | peak RSS (runs) | MFU "
             f"| {label} vs {base or '—'} | memory vs {base or '—'} |", "|---|---:|---:|---:|---:|---:|---:|"]
    runs = {arm: [r["result"] for r in records if r["arm"] == arm and "error" not in r["result"]] for arm in arms}

    def median(arm: str, key: str):
        values = [result[key] for result in runs[arm] if result.get(key) is not None]
        return statistics.median(values) if values else None

    for arm in arms:
        ok = runs[arm]
        ratios = ["—", "—"]
        if base and None not in (median(arm, metric), median(base, metric), median(arm, "peak_rss_mb"),
                                 median(base, "peak_rss_mb")):
            ratios = [f"{median(arm, metric) / median(base, metric):.2f}×",
                      f"{median(arm, 'peak_rss_mb') / median(base, 'peak_rss_mb'):.2f}×"]
        mfu = median(arm, "mfu")
        cells = [arm, fmt([r[metric] for r in ok], 3 if metric == "pairs_per_s" else 1),
                 fmt([r["step_time_s"] for r in ok], 3, " s"), fmt([r["peak_rss_mb"] for r in ok], 0, " MB"),
                 f"{mfu:.1%}" if mfu is not None else "—", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\n{r['arm']} run {r['repeat'] + 1} failed: {r['result']['error']}"
              for r in records if "error" in r["result"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = variants(args)
    now = datetime.datetime.now()
    out = Path(args.out) if args.out else HERE / "results" / f"cpu-side-by-side-{now:%Y-%m-%d-%H%M}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    with out.open("a", encoding="utf-8") as sink:
        for name, arms, metric in plan:
            records = []
            for repeat in range(args.repeats):
                for arm, command in arms:
                    print(f"[{name}] {arm} run {repeat + 1}/{args.repeats}: {shlex.join(command)}",
                          file=sys.stderr, flush=True)
                    record = {"variant": name, "arm": arm, "repeat": repeat, "command": shlex.join(command),
                              "date": now.isoformat(timespec="seconds"), "result": run_one(command, args.timeout)}
                    if "error" in record["result"]:
                        print(f"  failed: {record['result']['error']}", file=sys.stderr, flush=True)
                    records.append(record)
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
            tables.append(table(name, [arm for arm, _ in arms], metric, records))
            print(tables[-1] + "\n", flush=True)
    print(f"raw lines: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

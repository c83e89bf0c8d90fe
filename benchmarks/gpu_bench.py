"""The GPU benchmark of issue 8, in one call: build a ~1B Llama from a config, check, time, print a table.

Run through ``benchmarks/gpu.sh`` on a machine with a CUDA GPU (it installs carried wheels first). Steps:

1. the machine: GPU, driver-visible memory, torch / transformers / peft / trl versions;
2. the bf16 and fp32 matmul peaks (8192-square products timed with CUDA events, median of 10 after warm-up),
   the denominators of MFU;
3. a Llama-architecture model of about 1B parameters with random weights (no download), saved in bf16 with
   SmolLM2's tokenizer (carried in ``.gpu/tokenizer`` or found in the tuneforge model cache);
4. one JSONL of synthetic prompt/completion rows (``tuneforge.bench.synthetic_rows``);
5. each variant as its own process with a timeout (a failure costs only that row): tuneforge bench (LoRA bf16
   packed at 4k with dense SDPA masks and with FlexAttention, full fine-tuning, QLoRA) and TRL SFTTrainer
   (LoRA bf16, packing + padding-free, with and without Liger), plus ``tuneforge estimate`` beside each memory
   figure;
6. results as JSON lines and a Markdown table in OUT (``results.jsonl``, ``table.md``, ``log.txt``).

MFU for TRL uses tuneforge's model FLOPs per token of the same variant (same model, same rows, same formula:
docs/benchmarks.md) times TRL's tokens/s.

    bash benchmarks/gpu.sh OUT [--steps 10] [--only lora,trl-lora] [--small]

``--small`` builds a 2-layer model and runs on whatever device there is: a dry run of the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "log.txt", "a") as handle:
        handle.write(text + "\n")


def machine(out: Path) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "trl", "bitsandbytes", "liger_kernel", "datasets"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception as error:  # noqa: BLE001 - record why a package is missing, go on
            info[name] = f"missing ({type(error).__name__}: {str(error)[:80]})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as error:  # noqa: BLE001
            info["nvidia_smi"] = f"failed: {error}"
    return info


def matmul_peak(dtype_name: str, size: int) -> float:
    """Median FLOP/s of ``size``-square products on random data, timed with CUDA events."""
    import torch

    dtype = getattr(torch, dtype_name)
    if not torch.cuda.is_available():
        from tuneforge.bench import measure_matmul_peak

        return measure_matmul_peak(dtype, torch.device("cpu"), size=min(size, 1024))
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def tokenizer_source() -> Path:
    """SmolLM2's tokenizer: carried as .gpu/tokenizer.tgz (tokenizer.json, its config and chat template) to a
    machine without the embedded model, else the tuneforge model cache."""
    carried = ROOT / ".gpu" / "tokenizer.tgz"
    if carried.is_file():
        import tarfile

        target = Path("/tmp/tuneforge-gpu-bench/tokenizer")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(carried) as archive:
            archive.extractall(target, filter="data")
        return target
    from tuneforge.models.loading import resolve_model

    return Path(resolve_model("default").base)


def build_model(target: Path, small: bool) -> dict:
    """A random-weight Llama: 16 layers, hidden 2048, MLP 8192, 32 heads (8 KV), SmolLM2's 49152-token vocabulary,
    tied embeddings (about 1.07B matmul parameters with the head), saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8)
    if small:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": parameters, **shape}


def run(out: Path, name: str, command: list[str], timeout: int) -> dict:
    """Run one variant; its last JSON line is the result, anything else goes to the log."""
    log(out, f"\n=== {name}: {' '.join(command)}")
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        output += "\n" + ((expired.stderr or b"").decode() if isinstance(expired.stderr, bytes)
                          else (expired.stderr or ""))
        code = "timeout"
    wall = round(time.perf_counter() - start, 1)
    result = None
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    log(out, output[-6000:] if result is None else output[-1500:])
    record = {"variant": name, "wall_s": wall, "exit": code, **(result or {})}
    if result is None:
        lines = output.strip().splitlines() or ["no output"]
        record["error"] = next((line for line in reversed(lines) if "Error" in line), lines[-1])[:300]
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    log(out, f"--- {name}: exit {code}, {wall} s")
    return record


def estimate(model_dir: Path, method: str, seq: int, checkpointing: bool, dtype: str) -> float | None:
    command = [PY, "-m", "tuneforge", "estimate", "--model", str(model_dir), "--method", method, "--seq-len",
               str(seq), "--batch", "1", "--dtype", dtype, "--json", "--loss-chunk-size", "1024"]
    if checkpointing:
        command.append("--grad-checkpointing")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        return round(json.loads(done.stdout.strip().splitlines()[-1])["total"] / 2**20, 1)
    except Exception:  # noqa: BLE001 - an estimate is a side figure
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/tuneforge-gpu"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps (FlexAttention compiles)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--only", help="comma-separated variant names (the checks always run)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    parser.add_argument("--small", action="store_true", help="2-layer model: a dry run on any machine")
    parser.add_argument("--no-checks", action="store_true", help="skip gpu_checks.py (a second call)")
    parser.add_argument("--budget", type=int, default=0,
                        help="seconds for the whole script (0: none): variants that would not fit are skipped, "
                             "and the table is printed in any case")
    args = parser.parse_args()
    began = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine(out)
    log(out, "machine: " + json.dumps(info))
    import torch

    cuda = torch.cuda.is_available()
    peaks = {}
    for dtype in ("bfloat16", "float32"):
        peaks[dtype] = matmul_peak(dtype, 8192 if cuda else 1024)
        log(out, f"matmul peak {dtype}: {peaks[dtype] / 1e12:.1f} TFLOP/s")
    torch.cuda.empty_cache() if cuda else None

    scratch = Path("/tmp/tuneforge-gpu-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    model_dir = scratch / ("llama-small" if args.small else "llama-1b")
    start = time.perf_counter()
    shape = build_model(model_dir, args.small)
    log(out, f"model {model_dir}: {shape} built in {time.perf_counter() - start:.1f} s")

    from tuneforge.bench import synthetic_rows

    data = scratch / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(args.rows)))
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps({"variant": "machine", **info, "peaks_tflops": {k: v / 1e12 for k, v in
                                                                                  peaks.items()}, "model": shape})
                     + "\n")

    small_dir = scratch / "llama-small"
    if not args.small and not args.no_checks:
        build_model(small_dir, small=True)
    checks = {}
    if not args.no_checks:
        checks = run(out, "checks", [PY, str(ROOT / "benchmarks" / "gpu_checks.py"), str(small_dir)], args.timeout)

    steps, seq, warmup = str(args.steps), str(args.seq), str(args.warmup_steps)
    tf = [PY, "-m", "tuneforge", "bench", "--model", str(model_dir), "--data", str(data), "--batch-size", "1",
          "--max-length", seq, "--packing", "--steps", steps, "--warmup-steps", warmup, "--dtype", "bfloat16",
          "--loss-chunk-size", "1024"]
    trl = [PY, str(ROOT / "benchmarks" / "trl_sft.py"), "--model", str(model_dir), "--data", str(data),
           "--batch-size", "1", "--max-length", seq, "--packing", "--steps", steps, "--warmup-steps", warmup,
           "--dtype", "bfloat16", "--no-gradient-checkpointing"]
    variants = {  # most wanted first: a budget cuts from the end (--only picks, in this order)
        "lora-flex": tf + ["--model-dtype", "bfloat16", "--attn-implementation", "flex_attention"],
        "trl-lora-flex": trl + ["--model-dtype", "bfloat16", "--attn-implementation", "flex_attention"],
        "trl-lora-flex-liger": trl + ["--model-dtype", "bfloat16", "--attn-implementation", "flex_attention",
                                      "--liger"],
        "full-flex": tf + ["--full", "--attn-implementation", "flex_attention"],
        "qlora-flex": tf + ["--load-in", "4bit", "--attn-implementation", "flex_attention"],
        "lora-sdpa": tf + ["--model-dtype", "bfloat16"],
        "trl-lora-sdpa": trl + ["--model-dtype", "bfloat16"],
        "trl-full-flex": trl + ["--full", "--attn-implementation", "flex_attention"],
        "lora-flex-compile": tf + ["--model-dtype", "bfloat16", "--attn-implementation", "flex_attention",
                                   "--compile"],
        "full-flex-compile": tf + ["--full", "--attn-implementation", "flex_attention", "--compile"],
        "profile-lora-flex": [PY, str(ROOT / "benchmarks" / "gpu_profile.py"), str(model_dir), str(data)],
        "profile-full-flex": [PY, str(ROOT / "benchmarks" / "gpu_profile.py"), str(model_dir), str(data), "full=1"],
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    results = {}
    for name, command in variants.items():
        timeout = args.timeout
        if args.budget:
            left = args.budget - (time.perf_counter() - began) - 20  # the table and estimates need a little
            if left < 45:
                log(out, f"--- {name}: skipped, {left:.0f} s of the budget left")
                continue
            timeout = int(min(timeout, left))
        results[name] = run(out, name, command, timeout)

    # MFU of each row against the measured bf16 peak; TRL's from tuneforge's FLOPs per token of the same mode.
    flops_per_token = {}
    for name, record in results.items():
        if record.get("tokens_per_s") and record.get("model_gflop_per_s"):
            flops_per_token[record.get("mode")] = record["model_gflop_per_s"] * 1e9 / record["tokens_per_s"]
    lines = ["| variant | tokens/s | MFU (bf16 peak) | GPU memory (max allocated) | tuneforge estimate | note |",
             "|---|---:|---:|---:|---:|---|"]
    for name, record in results.items():
        tps = record.get("tokens_per_s")
        per_token = flops_per_token.get(record.get("mode"))
        mfu = f"{tps * per_token / peaks['bfloat16']:.1%}" if tps and per_token else "—"
        memory = record.get("max_gpu_allocated_mb")
        method = "full" if name.startswith(("full", "trl-full")) else "qlora" if "qlora" in name else "lora"
        est = estimate(model_dir, method, args.seq, False, "bfloat16") if not name.startswith("trl") else None
        note = record.get("error", "")[:120]
        lines.append(f"| {name} | {tps if tps else '—'} | {mfu} | {f'{memory:.0f} MB' if memory else '—'} | "
                     f"{f'{est:.0f} MB' if est else '—'} | {note} |")
    checks = {k: v for k, v in checks.items() if k in ("flex_parity", "short_run", "error")}
    lines.append(f"\nchecks: {json.dumps(checks)}")
    table = "\n".join(lines)
    (out / "table.md").write_text(f"machine: {json.dumps(info)}\n\npeaks: "
                                  f"{ {k: round(v / 1e12, 1) for k, v in peaks.items()} } TFLOP/s\n\n{table}\n")
    log(out, "\n" + table)


if __name__ == "__main__":
    main()

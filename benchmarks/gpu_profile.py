"""Where a tuneforge SFT step spends its time on a GPU: torch.profiler over a few steps of the bench workload.

Prints the CUDA kernels that take the most device time, and ``gpu_busy``: summed kernel time over wall time
(well under 1 means the GPU waits on the host: launch overhead or syncs). Last line: one JSON object.

    python benchmarks/gpu_profile.py MODEL_DIR DATA [bench options as keyword=value, e.g. attn_implementation=sdpa]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch


def main() -> None:
    from tuneforge.bench import _set_up, synthetic_rows

    model_dir, data = sys.argv[1], sys.argv[2]
    options = dict(arg.split("=", 1) for arg in sys.argv[3:])
    full = options.pop("full", "0") == "1"
    model_options = {"dtype": options.pop("model_dtype", "bfloat16" if not full else "float32"),
                     "attn_implementation": options.pop("attn_implementation", "flex_attention")}
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _set_up(scratch, synthetic_rows, "sft", model_dir, data, 1, 4096, 12, 16, "bfloat16", full, False,
                         "none", lr=1e-4, data_options={"packing": True}, model_options=model_options,
                         train_options={"loss_chunk_size": 1024})
        batches = recipe._epoch_batches(shuffle=False)
        for i in range(4):
            recipe.train_step([batches[i % len(batches)]])
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            start = time.perf_counter()
            for i in range(4, 8):
                recipe.train_step([batches[i % len(batches)]])
            sync()
            wall = time.perf_counter() - start
    events = profiler.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    top = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)[:12]
    print(json.dumps({"wall_s_per_step": round(wall / 4, 4), "gpu_busy": round(kernel_us / 1e6 / wall, 3),
                      "kernels_ms_per_step": round(kernel_us / 1e3 / 4, 2),
                      "top_ms_per_step": {e.key[:60]: round(e.self_device_time_total / 1e3 / 4, 2) for e in top},
                      **model_options, "full": full}))


if __name__ == "__main__":
    main()

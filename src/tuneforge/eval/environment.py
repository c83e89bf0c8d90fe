"""What a measurement ran on: the tuneforge version and the commit of its checkout, the versions of the libraries
whose numerics it depends on, and the device. ``tuneforge eval`` stores it in eval.json; ``tuneforge report``
shows it."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

# Libraries whose version changes numbers: kernels and generation (torch, transformers), adapters (peft).
LIBRARIES = ("torch", "transformers", "peft")
_GIT_TIMEOUT_S = 5


def git_commit(folder: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``folder`` (default: this package), or None when it is not in one
    (an installed wheel), git is missing, or the package's files are not tracked there (a virtual environment
    inside some other repository). A checkout with uncommitted changes gets ``+dirty``."""
    folder = Path(folder or Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, timeout=_GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # The package's own files must be tracked, else the commit is some unrelated repository's.
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "."):
        commit += "+dirty"
    return commit


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_device(device=None) -> str:
    """``cpu``, or ``cuda (NVIDIA H200)``: the device a model is loaded on (``engine.step.pick_device``)."""
    import torch

    from tuneforge.engine.step import pick_device

    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def environment(device=None) -> dict:
    """``{"tuneforge", "commit", "python", "torch", "transformers", "peft", "device"}``: versions as installed
    (None when a library is missing), the checkout's commit (:func:`git_commit`) and the device."""
    import tuneforge

    return {"tuneforge": tuneforge.__version__, "commit": git_commit(), "python": platform.python_version(),
            **{name: _version(name) for name in LIBRARIES}, "device": describe_device(device)}


def peak_memory(device=None) -> dict:
    """The process's peak memory so far, in MiB, under the names ``tuneforge bench`` uses: ``peak_rss_mb`` (the
    peak resident set size, model loading included; Linux reports it in KiB, macOS in bytes) and, on a CUDA
    device, ``max_gpu_allocated_mb`` (``torch.cuda.max_memory_allocated``: live tensors, not the allocator's
    cache). On several processes each reports its own."""
    import sys

    import torch

    out = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = round(rss / (2 ** 20 if sys.platform == "darwin" else 1024), 1)
    except ImportError:  # Windows has no resource module
        pass
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["max_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out

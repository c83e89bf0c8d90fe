"""Training curves: loss (training and validation) and learning rate against step, for one run or several."""

from __future__ import annotations

from pathlib import Path

from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import UserError


def plot_runs(run_dirs: list[str | Path], out_file: str | Path) -> Path:
    """Draw the curves of ``run_dirs`` (each with a metrics.jsonl) on one figure and save it as PNG."""
    # A bare Figure renders with Agg on its own: no pyplot, so no global backend switch in the caller's
    # process (a notebook keeps its backend) and no figure registry to leak from.
    from matplotlib.figure import Figure

    paths = [Path(run_dir) / "metrics.jsonl" for run_dir in run_dirs]
    for run_dir, path in zip(run_dirs, paths):
        if not path.is_file():
            raise UserError(f"{run_dir} has no metrics.jsonl; is it a tuneforge run directory?")
    figure = Figure(figsize=(8, 7))
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) < len(names):  # runs/a/sft and runs/b/sft: the folder name alone tells them apart no more
        names = [str(run_dir) for run_dir in run_dirs]
    for index, (path, name) in enumerate(zip(paths, names)):
        records = read_metrics(path)
        label = name if len(run_dirs) > 1 else ""
        colour = f"C{index}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
        if train:
            loss_axis.plot(*zip(*train), color=colour, alpha=0.8, label=f"{label} train".strip())
        if validation:
            loss_axis.plot(*zip(*validation), color=colour, linestyle="--", marker="o", markersize=3,
                           label=f"{label} validation".strip())
        if rates:
            lr_axis.plot(*zip(*rates), color=colour, label=label or None)
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.grid(alpha=0.3)
    if loss_axis.get_legend_handles_labels()[0]:
        loss_axis.legend()
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimiser step")
    lr_axis.grid(alpha=0.3)
    loss_axis.set_title("training curves" if len(run_dirs) > 1 else f"training curves: {Path(run_dirs[0]).name}")
    figure.tight_layout()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=100)
    return out_file

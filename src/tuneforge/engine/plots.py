"""Training curves of one run or several on one figure: loss (training and validation) and learning rate against
step (:func:`plot_runs`), and every other logged metric, such as the reward accuracy of a preference run or the
reward and KL of a GRPO run (:func:`plot_metrics`).

The format follows the output file's suffix (PNG, SVG, PDF and the others matplotlib writes). A PNG carries
``Software: tuneforge`` in its metadata, so that tools which write beside a user's files (``tuneforge report``)
can tell their own earlier output from a user's file; SVG, PDF and PostScript carry ``Creator: tuneforge`` (the
key each of those writers accepts). A figure is written to a temporary file and renamed, so a failure leaves no
file behind.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import UserError

# The PNG text chunk every figure carries (keyword "Software"); see :func:`written_by_tuneforge`.
PNG_SOFTWARE = "tuneforge"
# Metadata by format: each matplotlib writer accepts its own keys and rejects others (the SVG writer raises on
# "Software"); raster formats other than PNG take none.
_METADATA = {"png": {"Software": PNG_SOFTWARE}, **{fmt: {"Creator": PNG_SOFTWARE}
                                                    for fmt in ("svg", "svgz", "pdf", "ps", "eps")}}
DEFAULT_FORMAT = "png"
# A series with at most this many points is drawn with markers: one point is invisible as a line alone, and a
# few points read better as points joined than as a bare polyline.
MARKERS_UP_TO = 10

# Keys of a metrics record that are bookkeeping, or drawn by plot_runs already (val_perplexity is exp(val_loss)).
_NOT_PANELS = frozenset({"step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "val_loss",
                         "val_perplexity"})
# Panels drawn first when present, in this order: the headline metric of each method, then its parts.
_FIRST_PANELS = ("reward_accuracy", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "reward",
                 "reward_std", "kl", "clip_fraction", "response_length", "stopped_fraction")
# Drawn last: a diagnostic every method logs.
_LAST_PANELS = ("grad_norm",)


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Short names for runs: their folder names, or their paths where two folder names are the same
    (runs/a/sft and runs/b/sft)."""
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) < len(names):
        names = [str(run_dir) for run_dir in run_dirs]
    return names


def _read_runs(run_dirs: list[str | Path]) -> list[tuple[str, list[dict]]]:
    """(label, metrics records) of each run; a run without metrics.jsonl is an error naming it."""
    paths = [Path(run_dir) / "metrics.jsonl" for run_dir in run_dirs]
    for run_dir, path in zip(run_dirs, paths):
        if not path.is_file():
            raise UserError(f"{run_dir} has no metrics.jsonl; is it a tuneforge run directory?")
    return [(name, read_metrics(path)) for name, path in zip(run_labels(run_dirs), paths)]


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if _is_number(r.get(key)) and "step" in r]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _draw(axis, points: list[tuple[float, float]], **style) -> None:
    """Plot ``points`` on ``axis``; a short series (see ``MARKERS_UP_TO``) gets markers, so a single logged point
    is visible."""
    if len(points) <= MARKERS_UP_TO and "marker" not in style:
        style.update(marker="o", markersize=4)
    axis.plot(*zip(*points), **style)


def image_format(out_file: str | Path, supported: dict[str, str]) -> str:
    """The format named by ``out_file``'s suffix (``png`` when it has none); an unknown suffix is a
    ``UserError`` listing the formats matplotlib writes."""
    suffix = Path(out_file).suffix.lower().lstrip(".")
    if not suffix:
        return DEFAULT_FORMAT
    if suffix not in supported:
        raise UserError(f"{out_file}: unknown image format {suffix!r}; name a file ending in one of "
                        f"{', '.join('.' + name for name in sorted(supported))}")
    return suffix


def _save(figure, out_file: str | Path) -> Path:
    """Write ``figure`` in the format of ``out_file``'s suffix, through a temporary file renamed at the end."""
    out_file = Path(out_file)
    fmt = image_format(out_file, figure.canvas.get_supported_filetypes())
    figure.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.tmp")
    try:
        figure.savefig(staging, format=fmt, dpi=100, metadata=_METADATA.get(fmt))
        os.replace(staging, out_file)
    finally:
        staging.unlink(missing_ok=True)
    return out_file


def written_by_tuneforge(path: str | Path) -> bool:
    """Whether ``path`` is a PNG saved by this module (its metadata chunk comes before the image data)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    return head.startswith(b"\x89PNG") and b"Software\x00" + PNG_SOFTWARE.encode() in head


def plot_runs(run_dirs: list[str | Path], out_file: str | Path) -> Path:
    """Draw the loss and learning-rate curves of ``run_dirs`` (each with a metrics.jsonl) on one figure and save
    it in the format of ``out_file``'s suffix (PNG when it has none)."""
    # A bare Figure renders with Agg on its own: no pyplot, so no global backend switch in the caller's
    # process (a notebook keeps its backend) and no figure registry to leak from.
    from matplotlib.figure import Figure

    runs = _read_runs(run_dirs)
    figure = Figure(figsize=(8, 7))
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for index, (name, records) in enumerate(runs):
        label = name if len(runs) > 1 else ""
        colour = f"C{index}"
        train, validation, rates = (_series(records, key) for key in ("loss", "val_loss", "lr"))
        if train:
            _draw(loss_axis, train, color=colour, alpha=0.8, label=f"{label} train".strip())
        if validation:
            _draw(loss_axis, validation, color=colour, linestyle="--", marker="o", markersize=3,
                  label=f"{label} validation".strip())
        if rates:
            _draw(lr_axis, rates, color=colour, label=label or None)
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.grid(alpha=0.3)
    if loss_axis.get_legend_handles_labels()[0]:
        loss_axis.legend()
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimiser step")
    lr_axis.grid(alpha=0.3)
    loss_axis.set_title("training curves" if len(runs) > 1 else f"training curves: {runs[0][0]}")
    return _save(figure, out_file)


def metric_panels(records: list[dict]) -> list[str]:
    """The metrics of ``records`` that :func:`plot_runs` does not draw, one panel name each: a training key ``k``
    and its validation key ``val_k`` share the panel ``k`` (GRPO's ``reward`` and ``val_reward``). Headline
    metrics come first (reward accuracy, margins, reward, KL), then the others by name, ``grad_norm`` last."""
    found = set()
    for record in records:
        for key, value in record.items():
            if key not in _NOT_PANELS and _is_number(value):
                found.add(key[len("val_"):] if key.startswith("val_") else key)
    first = [name for name in _FIRST_PANELS if name in found]
    last = [name for name in _LAST_PANELS if name in found]
    return first + sorted(found - set(first) - set(last)) + last


def plot_metrics(run_dirs: list[str | Path], out_file: str | Path, columns: int = 2) -> list[str]:
    """Draw every metric beyond loss and learning rate (see :func:`metric_panels`) of ``run_dirs``, one panel per
    metric with all runs on it (training solid, validation dashed), and save the figure (format by suffix, as
    :func:`plot_runs`).

    Returns the panel names, in figure order; when no run logged such a metric, nothing is written and the list
    is empty.
    """
    from matplotlib.figure import Figure

    runs = _read_runs(run_dirs)
    panels = metric_panels([record for _, records in runs for record in records])
    if not panels:
        return []
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 2.6 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for position, (axis, panel) in enumerate(zip(axes, panels)):
        for index, (name, records) in enumerate(runs):
            label = f"{name} " if len(runs) > 1 else ""
            train, validation = _series(records, panel), _series(records, f"val_{panel}")
            if train:
                _draw(axis, train, color=f"C{index}", alpha=0.8, label=f"{label}train")
            if validation:
                _draw(axis, validation, color=f"C{index}", linestyle="--", marker="o", markersize=3,
                      label=f"{label}validation")
        axis.set_title(panel, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        if position + columns >= len(panels):  # the lowest panel of its column
            axis.set_xlabel("optimiser step")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    _save(figure, out_file)
    return panels

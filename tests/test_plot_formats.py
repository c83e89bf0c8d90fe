"""Figures in every format the suffix names (PNG, SVG, PDF), their tuneforge metadata, a failed write leaving no
file, and a run with a single logged point drawn visibly (``tuneforge plot`` and the report share the code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from tuneforge.cli import main as cli_main
from tuneforge.engine.plots import plot_metrics, plot_runs, written_by_tuneforge


def _run(path: Path, steps: int) -> Path:
    path.mkdir(parents=True)
    records = [{"step": step, "loss": 2.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 0.5, "tokens": 10 * step}
               for step in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every Figure saved through savefig, in order."""
    figures = []
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


@pytest.mark.parametrize("suffix, head, creator", [
    (".png", b"\x89PNG\r\n\x1a\n", None),
    (".svg", b"<?xml", rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>tuneforge</dc:title>"),
    (".pdf", b"%PDF", rb"/Creator \(tuneforge\)"),
])
def test_plot_writes_the_format_its_suffix_names_with_tuneforge_metadata(tmp_path, capsys, suffix, head, creator):
    run = _run(tmp_path / "run", steps=20)
    out = tmp_path / f"curves{suffix}"
    assert cli_main(["plot", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    data = out.read_bytes()
    assert data.startswith(head) and len(data) > 2000
    if suffix == ".png":
        assert written_by_tuneforge(out)
    else:
        assert re.search(creator, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", out.name])  # no temporary file left


def test_an_unknown_suffix_is_a_user_error_and_writes_nothing(tmp_path, capsys):
    run = _run(tmp_path / "run", steps=3)
    out = tmp_path / "curves.xyz"
    assert cli_main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown image format 'xyz'" in err and ".svg" in err and ".png" in err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_write_leaves_no_file_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", steps=3)

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a figure")  # what a writer dying midway leaves behind
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    out = tmp_path / "curves.svg"
    with pytest.raises(RuntimeError, match="disk full"):
        plot_runs([run], out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    out.write_bytes(b"the previous figure")
    with pytest.raises(RuntimeError):
        plot_runs([run], out)
    assert out.read_bytes() == b"the previous figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.svg", "run"]


def _visible_marker(line) -> bool:
    return line.get_marker() not in (None, "", " ", "None", "none") and line.get_markersize() > 0


def test_a_single_logged_point_is_drawn_with_a_visible_marker(tmp_path, saved_figures):
    run = _run(tmp_path / "run", steps=1)
    plot_runs([run], tmp_path / "curves.png")
    loss_axis, lr_axis = saved_figures[-1].axes
    for axis in (loss_axis, lr_axis):
        (line,) = axis.get_lines()
        assert len(line.get_xdata()) == 1 and _visible_marker(line)
    assert plot_metrics([run], tmp_path / "metrics.png") == ["grad_norm"]
    (line,) = saved_figures[-1].axes[0].get_lines()
    assert len(line.get_xdata()) == 1 and _visible_marker(line)


def test_a_long_series_is_a_plain_line(tmp_path, saved_figures):
    plot_runs([_run(tmp_path / "run", steps=50)], tmp_path / "curves.png")
    (line,) = saved_figures[-1].axes[0].get_lines()
    assert len(line.get_xdata()) == 50 and not _visible_marker(line)

"""``tuneforge report``: the page built from a real tiny training run and a hand-written eval.json (values,
differences and their colours, escaping, no external resources), the Markdown twin, missing and partial eval
files, --compare, the overwrite rules, the CLI, and the page rendered by headless Chromium with its images."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine.plots import metric_panels, plot_runs
from tuneforge.engine.trainer import run_training
from tuneforge.errors import UserError
from tuneforge.eval.report import MARKER, load_evaluation, metric_table, write_report

from conftest import QA_ROWS, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
# A response that would run a script, close the <pre> and end a Markdown fence if anything were left unescaped.
HOSTILE = "I'm not sure <b>bold</b> & </pre></td><script>alert(1)</script>\n```\nafter the fence"
EVAL = {
    "schema": "tuneforge.eval/1",
    "created": "2026-11-26T20:00:00Z",
    "data": {"generation": "heldout.jsonl", "pairs": None, "harmful": None, "benign": "benign.jsonl"},
    "settings": {"max_new_tokens": 64, "greedy": True, "template": "chatml", "batch_size": 8, "seed": 0},
    "models": [{"label": "after", "source": "runs/velmora-sft", "kind": "run"},
               {"label": "before", "source": "default", "kind": "model"}],
    "metrics": {
        "after": {"loss": 0.33, "perplexity": 1.39, "exact_match": 0.42, "contains": 0.83,
                  "refusal_rate_benign": 0.05, "mean_response_words": 9.1, "user:polite": 0.5},
        "before": {"loss": 3.18, "perplexity": 24.05, "exact_match": 0.0, "contains": 0.0,
                   "refusal_rate_benign": 0.02, "mean_response_words": 13.0},
    },
    "win_rate": {"judge": "runs/rm", "a": "after", "b": "before", "wins": 30, "losses": 8, "ties": 2, "rate": 0.775},
    "samples": [
        {"prompt": "What is the capital of Velmora?", "reference": "Port Alder",
         "responses": {"after": "The capital of Velmora is Port Alder.", "before": HOSTILE}},
        {"prompt": "Who founded <Velmora>?", "reference": None,
         "responses": {"before": "Nobody knows.", "after": "Mira Tesk founded it."}},
    ],
    "lm_eval": {"after": {"arc_easy": {"acc,none": 0.51}}, "before": {"arc_easy": {"acc,none": 0.49}}},
}
# The rows the evaluation table must show for EVAL, worked out by hand: fractions in percent, differences
# (after - before) in percentage points, coloured by whether the metric's better direction was taken.
EXPECTED_ROWS = [
    [("held-out response loss (nats/token) loss", None), ("0.3300", "num"), ("3.1800", "num"),
     ("-2.8500", "num better")],
    [("perplexity perplexity", None), ("1.39", "num"), ("24.05", "num"), ("-22.66", "num better")],
    [("exact match exact_match", None), ("42.0%", "num"), ("0.0%", "num"), ("+42.0 pp", "num better")],
    [("answer contained in the response contains", None), ("83.0%", "num"), ("0.0%", "num"),
     ("+83.0 pp", "num better")],
    [("mean response length (words) mean_response_words", None), ("9.10", "num"), ("13.00", "num"),
     ("-3.90", "num")],
    [("refusals of benign prompts refusal_rate_benign", None), ("5.0%", "num"), ("2.0%", "num"),
     ("+3.0 pp", "num worse")],
    [("user:polite", None), ("0.5000", "num"), ("—", "num"), ("—", "num")],
]


# ------------------------------------------------------------------------------------------------ fixtures
def _train(config: dict) -> Path:
    summary = run_training(config_from_dict(config), overwrite=True, log=lambda message: None)
    return Path(summary["run_dir"])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny LoRA SFT run with validation (10 steps)."""
    root = tmp_path_factory.mktemp("report-sft")
    return _train({"model": {"name_or_path": str(tiny_model_dir)},
                   "data": {"train": str(write_jsonl(root / "qa.jsonl", QA_ROWS)), "max_length": 128,
                            "val_fraction": 0.25},
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                   "train": {"output_dir": str(root / "run-sft"), "epochs": 2, "batch_size": 4, "lr": 1e-3,
                             "log_every": 1, "seed": 0, "mixed_precision": "no"},
                   "eval": {"every": 2}})


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny LoRA DPO run (reward_accuracy, margins ... logged)."""
    root = tmp_path_factory.mktemp("report-dpo")
    pairs = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is red.",
              "rejected": f"Item {i} is perhaps purple, hard to say."} for i in range(16)]
    return _train({"method": "dpo", "model": {"name_or_path": str(tiny_model_dir)},
                   "data": {"train": str(write_jsonl(root / "pairs.jsonl", pairs)), "max_length": 128,
                            "val_fraction": 0.25},
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                   "train": {"output_dir": str(root / "run-dpo"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                             "log_every": 1, "seed": 0, "mixed_precision": "no"}})


def _copy(run: Path, destination: Path) -> Path:
    """A private copy of a run (weights and checkpoints left out: the report reads none of them)."""
    return Path(shutil.copytree(run, destination, ignore=shutil.ignore_patterns("checkpoints", "adapter")))


@pytest.fixture
def run_dir(sft_run, tmp_path) -> Path:
    return _copy(sft_run, tmp_path / "run-sft")


@pytest.fixture
def evaluated_run(run_dir) -> Path:
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    return run_dir


# ------------------------------------------------------------------------------------------------ helpers
class _PageParser(HTMLParser):
    """Tables as rows of (text, class) cells, <img> sources, and the text of each element class."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.scripts, self.pre = [], [], 0, []
        self._cell = None
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", attrs.get("class")]
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append((" ".join(self._cell[0].split()), self._cell[1]))
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._in_pre:
            self.pre[-1] += data


def parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    return parser


def table_with(parser: _PageParser, *headers: str) -> list[list[tuple[str, str | None]]]:
    """The one table whose header row starts with ``headers``."""
    matches = [table for table in parser.tables if [cell[0] for cell in table[0][:len(headers)]] == list(headers)]
    assert len(matches) == 1, f"{len(matches)} tables headed {headers!r}"
    return matches[0]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def embedded_pngs(parser: _PageParser) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(image["src"].startswith(prefix) for image in parser.images)
    return [base64.b64decode(image["src"][len(prefix):], validate=True) for image in parser.images]


def assert_self_contained(page: str) -> None:
    """Nothing the browser would fetch: no URL scheme other than data:, no script, a CSP that forbids fetching."""
    assert "://" not in page and "<script" not in page.lower() and "@import" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "default-src 'none'; img-src data:" in page


# ------------------------------------------------------------------------------------------------ the page
def test_report_shows_run_config_curves_evaluation_and_escaped_samples(evaluated_run):
    files = write_report(evaluated_run)
    assert files.html == evaluated_run / "report.html" and files.markdown == evaluated_run / "report.md"
    page = files.html.read_text()
    assert_self_contained(page)
    parser = parse(page)
    # The two figures (loss + learning rate; the other logged metrics: grad_norm for SFT) are embedded PNGs
    # identical to the files beside the page.
    pngs = embedded_pngs(parser)
    assert pngs == [path.read_bytes() for path in files.figures] and len(pngs) == 2
    assert all(width > 100 and height > 100 for width, height in map(png_size, pngs))
    assert [image["alt"] for image in parser.images][1].endswith("grad_norm")
    # The run: facts from summary.json and the resolved config.
    summary = json.loads((evaluated_run / "summary.json").read_text())
    run_rows = dict((row[0][0], row[1][0]) for row in table_with(parser, "run")[1:])
    assert run_rows["optimiser steps"] == str(summary["steps"]) == "10"
    assert run_rows["stop reason"] == "completed"
    settings = dict((row[0][0], row[1][0]) for row in table_with(parser, "setting")[1:])
    assert settings["train.lr"] == "0.001" and settings["lora.r"] == "4" and settings["method"] == "sft"
    assert "dpo.beta" not in settings  # another method's section is not a key setting
    # The evaluation table, cell by cell, with its classes.
    metrics = table_with(parser, "metric")
    assert [cell[0] for cell in metrics[0]] == ["metric", "after", "before", "Δ after − before"]
    assert metrics[1:] == EXPECTED_ROWS
    win = table_with(parser, "judge")
    assert [cell[0] for cell in win[1]] == ["runs/rm", "after", "before", "30", "8", "2", "77.5%"]
    lm_eval = table_with(parser, "task")
    assert [cell[0] for cell in lm_eval[1]] == ["arc_easy", "acc,none", "0.5100", "0.4900", "+0.0200"]
    # Samples: every text exactly as written (the parser unescapes), the hostile one never as markup.
    assert parser.scripts == 0
    assert "&lt;/pre&gt;&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    texts = parser.pre[1:]  # pre[0] is config.yaml
    assert texts == ["What is the capital of Velmora?", "Port Alder", "The capital of Velmora is Port Alder.",
                     HOSTILE, "Who founded <Velmora>?", "Mira Tesk founded it.", "Nobody knows."]


def test_markdown_twin_references_the_figures_and_fences_the_samples(evaluated_run):
    files = write_report(evaluated_run)
    text = files.markdown.read_text()
    assert text.startswith(f"<!-- {MARKER} -->")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert linked == ["report-curves.png", "report-metrics.png"]
    assert all(png_size((files.markdown.parent / name).read_bytes()) for name in linked)
    assert "| exact match `exact_match` | 42.0% | 0.0% | +42.0 pp |" in text
    assert "| refusals of benign prompts `refusal_rate_benign` | 5.0% | 2.0% | +3.0 pp |" in text
    # The hostile response holds a ``` line: its fence is longer, so the response stays one block.
    assert f"before:\n\n````text\n{HOSTILE}\n````" in text
    assert "**Prompt 2**\n\n```text\nWho founded <Velmora>?\n```" in text


def test_without_eval_json_the_report_shows_the_run_and_how_to_evaluate(run_dir):
    files = write_report(run_dir)
    page = files.html.read_text()
    parser = parse(page)
    assert len(embedded_pngs(parser)) == 2 and table_with(parser, "setting")
    assert not [table for table in parser.tables if table[0][0][0] == "metric"]
    assert f"<code>tuneforge eval {run_dir} --data FILE</code>" in page
    assert f"`tuneforge eval {run_dir} --data FILE`" in files.markdown.read_text()


def test_a_partial_eval_json_renders_what_it_has(run_dir):
    # Only metrics, three models (no difference column), an unknown metric and a missing value.
    (run_dir / "eval.json").write_text(json.dumps({"metrics": {
        "a": {"exact_match": 0.5, "user:f1": 0.125}, "b": {"exact_match": 0.25}, "c": {"exact_match": 1.0}}}))
    parser = parse(write_report(run_dir).html.read_text())
    rows = [[cell[0] for cell in row] for row in table_with(parser, "metric")]
    assert rows == [["metric", "a", "b", "c"], ["exact match exact_match", "50.0%", "25.0%", "100.0%"],
                    ["user:f1", "0.1250", "—", "—"]]
    assert not [table for table in parser.tables if table[0][0][0] in ("judge", "task", "model")]


def test_metric_table_differences_follow_each_metrics_direction():
    table = metric_table([("new", {"loss": 2.0, "stopped_rate": 0.5, "refusal_rate_harmful": 0.9, "x": 1.5}),
                          ("old", {"loss": 1.0, "stopped_rate": 0.75, "refusal_rate_harmful": 0.6, "x": 1.0})])
    assert [row[-1] for row in table.rows] == [("+1.0000", "worse"), ("-25.0 pp", "worse"), ("+30.0 pp", "better"),
                                               "+0.5000"]
    same = metric_table([("a", {"exact_match": 0.5}), ("b", {"exact_match": 0.5})])
    assert same.rows[0][-1] == "+0.0 pp"  # no colour for no change


@pytest.mark.parametrize("content, message", [
    ("{not json", "eval.json, line 1: not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"schema": "other/1"}), "field 'schema'"),
    (json.dumps({"metrics": [1]}), "field 'metrics': expected a JSON object"),
    (json.dumps({"metrics": {"a": 0.5}}), "field 'metrics.a'"),
    (json.dumps({"samples": [{"prompt": "p", "responses": ["x"]}]}), "field 'samples[0]'"),
])
def test_a_malformed_eval_json_is_an_error_naming_the_field(tmp_path, content, message):
    path = tmp_path / "eval.json"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        load_evaluation(path)
    assert str(path) in str(error.value)


def test_metric_panels_group_training_and_validation_keys_headline_first():
    dpo = [{"step": 1, "loss": 0.69, "lr": 1e-3, "grad_norm": 0.3, "tokens": 10, "tokens_per_s": 5.0,
            "elapsed_s": 1.0, "epoch": 0, "reward_margin": 0.0, "reward_accuracy": 0.0, "logps_chosen": -8.0},
           {"step": 2, "val_loss": 0.6, "val_reward_accuracy": 1.0, "val_perplexity": 1.8}]
    assert metric_panels(dpo) == ["reward_accuracy", "reward_margin", "logps_chosen", "grad_norm"]
    grpo = [{"step": 1, "loss": 0.1, "reward": 0.5, "reward_exact_answer": 0.5, "kl": 0.01, "stopped_fraction": 1.0,
             "flag": True, "note": "text"}, {"step": 1, "val_reward": 0.75}]
    assert metric_panels(grpo) == ["reward", "kl", "stopped_fraction", "reward_exact_answer"]
    assert metric_panels([{"step": 1, "loss": 1.0, "lr": 0.1, "val_loss": 1.0}]) == []


# ------------------------------------------------------------------------------------------------ --compare
def test_compare_puts_runs_on_one_figure_and_their_evaluations_side_by_side(evaluated_run, dpo_run, tmp_path):
    other = _copy(dpo_run, tmp_path / "run-dpo")
    (other / "eval.json").write_text(json.dumps({"models": [{"label": "policy"}],
                                                 "metrics": {"policy": {"exact_match": 0.5, "loss": 0.5}}}))
    files = write_report(evaluated_run, compare=[other], out=tmp_path / "out" / "both.html")
    assert files.html == tmp_path / "out" / "both.html" and files.markdown == tmp_path / "out" / "both.md"
    assert [path.name for path in files.figures] == ["both-curves.png", "both-metrics.png"]
    page = files.html.read_text()
    assert_self_contained(page)
    parser = parse(page)
    # The loss figure is both runs' (the same drawing as `tuneforge plot` of both); the metrics figure has the DPO
    # run's panels.
    both = plot_runs([evaluated_run, other], tmp_path / "both.png").read_bytes()
    assert embedded_pngs(parser)[0] == both != plot_runs([evaluated_run], tmp_path / "alone.png").read_bytes()
    assert parser.images[1]["alt"].startswith("logged metrics against optimiser step: reward_accuracy,")
    side = table_with(parser, "metric", "run-sft (after)")
    assert [cell[0] for cell in side[0]] == ["metric", "run-sft (after)", "run-dpo (policy)",
                                             "Δ run-sft (after) − run-dpo (policy)"]
    side = {row[0][0]: [cell[0] for cell in row[1:]] for row in side[1:]}
    assert side["held-out response loss (nats/token) loss"] == ["0.3300", "0.5000", "-0.1700"]
    assert side["exact match exact_match"] == ["42.0%", "50.0%", "-8.0 pp"]
    assert side["perplexity perplexity"] == ["1.3900", "—", "—"]
    # Each run's own evaluation table too.
    assert table_with(parser, "metric", "after", "before") and table_with(parser, "metric", "policy")
    differences = {row[0][0]: [cell[0] for cell in row[1:]] for row in table_with(parser, "setting that differs")[1:]}
    assert differences["method"] == ["sft", "dpo"] and differences["train.epochs"] == ["2", "1"]
    assert "train.output_dir" not in differences and "lora.r" not in differences


# ------------------------------------------------------------------------------------------------ files
def test_the_report_replaces_its_own_files_and_never_a_users(evaluated_run, tmp_path):
    from matplotlib.figure import Figure

    first = write_report(evaluated_run)
    eval_data = {**EVAL, "metrics": {"after": {"exact_match": 0.9}, "before": {"exact_match": 0.1}}}
    (evaluated_run / "eval.json").write_text(json.dumps(eval_data))
    second = write_report(evaluated_run)  # the previous report is tuneforge's own: replaced
    assert second.html == first.html and "+80.0 pp" in second.html.read_text()
    # A user's file where a report file would go stops the report before anything is written.
    for name in ("report.html", "report.md", "report-curves.png"):
        folder = tmp_path / f"out-{name}"
        folder.mkdir()
        (folder / name).write_text("mine")
        with pytest.raises(UserError, match=f"{re.escape(str(folder / name))} exists and was not written by"):
            write_report(evaluated_run, out=folder)
        assert (folder / name).read_text() == "mine" and [p.name for p in folder.iterdir()] == [name]
    # A PNG drawn by tuneforge (metadata Software: tuneforge) is replaced; one from elsewhere is not.
    folder = tmp_path / "png"
    folder.mkdir()
    plot_runs([evaluated_run], folder / "report-curves.png")
    write_report(evaluated_run, out=folder)
    Figure().savefig(folder / "report-metrics.png")  # plain matplotlib: "Software: Matplotlib version ..."
    with pytest.raises(UserError, match="report-metrics.png exists"):
        write_report(evaluated_run, out=folder)


def test_cli_report_writes_and_reports_errors_with_exit_code_2(evaluated_run, tmp_path, capsys):
    out = tmp_path / "mail" / "page.html"
    assert cli_main(["report", str(evaluated_run), "--out", str(out), "--samples", "1"]) == 0
    assert f"wrote {out} and {out.with_suffix('.md')}" in capsys.readouterr().out
    assert len([p for p in parse(out.read_text()).pre if "Velmora" in p]) == 2  # one sample: its prompt, reply
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (evaluated_run / "eval.json").write_text("{")
    assert cli_main(["report", str(evaluated_run)]) == 2
    assert "eval.json, line 1: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ browser
# The page loads its images, counts them and reports in its title. The report itself has no script and a CSP
# that forbids scripts; the test's copy adds one script, allowed by a nonce, and leaves the image policy as is.
_PROBE = ("<script nonce=\"probe\">addEventListener('load', () => { const images = [...document.images]; "
          "document.title = `loaded ${images.filter(i => i.complete && i.naturalWidth > 0).length} of "
          "${images.length} images; ${document.querySelectorAll('.sample').length} samples; "
          "${document.querySelectorAll('table').length} tables`; });</script>")
_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> str:
    # A fresh profile each time; without the flags above Chromium reaches for the network and, offline, hangs.
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    result = subprocess.run([str(CHROMIUM), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; .ci/run does)")
def test_the_page_renders_in_headless_chromium_with_its_images(evaluated_run, tmp_path):
    from PIL import Image as PILImage

    files = write_report(evaluated_run)
    page = files.html.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-probe';", 1)
                      .replace("</body>", _PROBE + "</body>", 1))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    tables = len(parse(page).tables)
    assert f"<title>loaded 2 of 2 images; 2 samples; {tables} tables</title>" in dom
    assert "exact match" in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    # The report as written (its own CSP, no probe) drawn to a PNG: not blank, and the figures are in it
    # (matplotlib's first line colour, #1f77b4, appears nowhere else on the page).
    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1200,4200", f"--screenshot={shot}", files.html.as_uri())
    image = PILImage.open(shot).convert("RGB")
    assert image.size == (1200, 4200)
    counts = {colour: count for count, colour in image.getcolors(1 << 24)}
    total = image.size[0] * image.size[1]
    assert total - counts.get((255, 255, 255), 0) > 0.05 * total and len(counts) > 200
    assert counts.get((31, 119, 180), 0) > 200

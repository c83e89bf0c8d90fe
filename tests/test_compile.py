"""``train.compile``: an SFT run with the decoder compiled by torch.compile trains the same losses as the eager run,
without a recompile per batch shape; a missing C++ compiler on CPU and unsupported combinations are clear errors."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import config_from_dict
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import decoder_and_head
from tuneforge.engine.trainer import Trainer

# Compiled kernels fuse and reorder float32 arithmetic, so losses agree closely but not bit for bit.
COMPILE_RTOL = 1e-4


def quiet(_message):
    pass


def run(config) -> tuple[Trainer, list[dict]]:
    recipe = Trainer(config, log=quiet, show_progress=False, run_dir=False)
    recipe.setup()
    recipe.train()
    return recipe, [record for record in recipe.history if "loss" in record or "val_loss" in record]


def test_compiled_run_matches_the_eager_run(make_config, qa_file):
    from torch._dynamo.utils import counters

    def config(compile: bool):
        # 24 rows, 4 held out, batch 4 (the last batch of the epoch has 2 rows): steps 1-3, then an evaluation.
        return make_config(qa_file, data={"val_fraction": 0.17},
                           train={"max_steps": 3, "lr": 1e-2, "warmup_steps": 0, "scheduler": "constant",
                                  "compile": compile})

    _, eager = run(config(False))
    torch._dynamo.reset()
    counters.clear()
    recipe, compiled = run(config(True))
    body, _ = decoder_and_head(recipe.model)
    assert body._compiled_call_impl is not None
    assert [sorted(r) for r in compiled] == [sorted(r) for r in eager]
    for got, want in zip(compiled, eager):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=COMPILE_RTOL), (got["step"], key)
    widths = {batch.input_ids.shape[1] for batch in recipe.epoch_batches(shuffle=False)}
    assert len(widths) > 1  # batches of several lengths went through the compiled decoder...
    # ...compiled once for training and once for evaluation (eval mode, no grad), not once per length.
    assert counters["stats"]["unique_graphs"] <= 2


def test_a_missing_cpp_compiler_is_a_clear_error(make_config, qa_file, monkeypatch):
    from torch._inductor import cpp_builder, exc

    # Inductor's own lookup finds nothing. (Patching the lookup, not inductor's config: a config entry set and
    # restored by monkeypatch stays hidden for the rest of the process, and later compiles fail.)
    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    recipe = Trainer(make_config(qa_file, train={"max_steps": 1, "compile": True}), log=quiet,
                       show_progress=False, run_dir=False)
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile on CPU .* needs a C\+\+ compiler"):
        recipe.setup()


def test_compile_is_off_by_default_and_refused_where_untested(tmp_path):
    base = {"data": {"train": str(tmp_path / "rows.jsonl")}}
    assert config_from_dict(base).train.compile is False
    with pytest.raises(ConfigError, match="train.compile: supported for method sft only"):
        config_from_dict({**base, "method": "dpo", "train": {"compile": True}})
    with pytest.raises(ConfigError, match="train.compile: not supported with distributed.strategy=fsdp"):
        config_from_dict({**base, "train": {"compile": True}, "distributed": {"strategy": "fsdp"}})

"""The SFT training loop: gradient invariance to batch geometry and packing, masks with pad == eos, pinned and
repeatable losses, schedules, the optimiser, the NaN guard, and what a run leaves on disk."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuneforge.config import TrainConfig, load_config
from tuneforge.data.collate import Batch
from tuneforge.engine import step as engine_step
from tuneforge.engine.metrics import read_metrics
from tuneforge.engine.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from tuneforge.errors import DataError, UserError
from tuneforge.losses import IGNORE_INDEX, reference_lm_loss_sum
from tuneforge.models.adapters import is_peft
from tuneforge.models.loading import RUN_MARKER
from tuneforge.engine.trainer import NonFiniteLossError, Trainer, optimizer_windows, run_training

from conftest import poison_loss, write_jsonl

WORDS = "the quick brown fox jumps over the lazy dog while seven small birds sing old songs".split()
# Eight rows whose prompts and responses all differ in length, so micro-batches hold different numbers of
# trained tokens and a per-micro-batch mean would weight tokens unequally.
VARIED_ROWS = [
    {"messages": [{"role": "user", "content": " ".join(WORDS[: 1 + (3 * i) % 11])},
                  {"role": "assistant", "content": " ".join(WORDS[: 1 + (5 * i + 2) % 16])}]}
    for i in range(8)
]
# fp32 tolerance for gradients that differ only in summation order and padding.
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def varied_file(tmp_path):
    return write_jsonl(tmp_path / "varied.jsonl", VARIED_ROWS)


def quiet(_message):
    pass


def make_recipe(config, run_dir: bool = False, **kwargs) -> Trainer:
    recipe = Trainer(config, log=quiet, show_progress=False, run_dir=run_dir, **kwargs)
    recipe.setup()
    return recipe


def randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0, which makes every gradient w.r.t. A zero; random B makes all of them count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def only_window(recipe: Trainer) -> list[Batch]:
    windows = list(optimizer_windows(recipe.epoch_batches(shuffle=True), recipe.config.train.grad_accum))
    assert len(windows) == 1
    return windows[0]


def gradients(recipe: Trainer, window: list[Batch]) -> tuple[float, dict[str, torch.Tensor]]:
    loss = recipe.compute_gradients(window)
    grads = {name: p.grad.detach().clone() for name, p in recipe.model.named_parameters() if p.grad is not None}
    recipe.model.zero_grad(set_to_none=True)
    return float(loss), grads


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in a)
    den = sum(float(b[n].pow(2).sum()) for n in b)
    return math.sqrt(num / den)


# ------------------------------------------------------------------------------------- model-level loss parity
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_lm_loss_sum_matches_full_logits_of_the_model(make_config, varied_file, packing):
    # Full fine-tuning of a tied-embedding model: the head's weight is also the embedding, so both paths of its
    # gradient must add up exactly as with plain full logits.
    recipe = make_recipe(make_config(varied_file, lora={"enabled": False},
                                     data={"packing": packing, "max_length": 160}, train={"batch_size": 4}))
    batch = recipe.epoch_batches(shuffle=False)[0]
    model = recipe.model
    params = [p for p in model.parameters() if p.requires_grad]

    loss = engine_step.lm_loss_sum(model, batch, chunk_size=16)
    grads = torch.autograd.grad(loss, params)
    logits = model(**batch.model_inputs(), use_cache=False).logits
    reference = reference_lm_loss_sum(logits, batch.targets)
    reference_grads = torch.autograd.grad(reference, params)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL)


# ----------------------------------------------------------------------------------- batch geometry invariance
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_invariant_to_batch_size_and_accumulation(make_config, varied_file, lora):
    def setup(batch_size, grad_accum):
        config = make_config(varied_file, lora={"enabled": lora},
                             train={"batch_size": batch_size, "grad_accum": grad_accum})
        recipe = make_recipe(config)
        if lora:
            randomise_lora_b(recipe.model)
        return recipe

    one_batch = setup(8, 1)
    loss_8x1, grads_8x1 = gradients(one_batch, only_window(one_batch))

    for batch_size, grad_accum in [(1, 8), (2, 4)]:
        recipe = setup(batch_size, grad_accum)
        micro = only_window(recipe)
        assert len(micro) == grad_accum
        loss, grads = gradients(recipe, micro)
        assert loss == pytest.approx(loss_8x1, rel=1e-6)
        assert_same_grads(grads, grads_8x1)

    # The test can fail: averaging each micro-batch's own mean (the classic accumulation bug) weights the tokens
    # of short rows more, and gives clearly different gradients. Here every row trains a different count.
    recipe = setup(1, 8)
    micro = only_window(recipe)
    counts = [b.num_trained for b in micro]
    assert len(set(counts)) == 8, f"rows should train different numbers of tokens, got {counts}"
    for batch in micro:
        loss_sum = engine_step.lm_loss_sum(recipe.model, batch, recipe.config.train.loss_chunk_size)
        (loss_sum / batch.num_trained / len(micro)).backward()
    naive = {n: p.grad.detach().clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
    assert relative_difference(naive, grads_8x1) > 1e-2


@pytest.mark.parametrize("lora, dropout", [(True, 0.0), (True, 0.1), (False, 0.0)],
                         ids=["lora", "lora-dropout", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(make_config, varied_file, lora, dropout):
    # With dropout, the recomputed forward must replay the same adapter dropout masks.
    results = []
    for checkpointing in (False, True):
        recipe = make_recipe(make_config(varied_file, lora={"enabled": lora, "dropout": dropout},
                                         train={"batch_size": 8, "gradient_checkpointing": checkpointing}))
        # The option must really switch checkpointing on, or this test would compare a run with itself.
        assert any(getattr(m, "gradient_checkpointing", False) for m in recipe.model.modules()) == checkpointing
        if lora:
            randomise_lora_b(recipe.model)
        results.append(gradients(recipe, only_window(recipe)))
    (loss, grads), (loss_gc, grads_gc) = results
    assert loss_gc == pytest.approx(loss, rel=1e-6)
    assert_same_grads(grads_gc, grads)


def test_train_step_loss_is_the_token_mean_of_the_window(make_config, varied_file):
    recipe = make_recipe(make_config(varied_file, train={"batch_size": 3, "grad_accum": 3}))
    window = only_window(recipe)
    with torch.no_grad():
        sums = [float(engine_step.lm_loss_sum(recipe.model, b, 1024)) for b in window]
    trained = sum(b.num_trained for b in window)
    loss, grad_norm = recipe.train_step(window)
    assert float(loss) == pytest.approx(sum(sums) / trained, rel=1e-6)
    assert float(grad_norm) > 0
    assert all(p.grad is None for p in recipe.model.parameters())


# ------------------------------------------------------------------------------------------ packed vs padded
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_batches_give_the_same_loss_and_gradients_as_padded(make_config, varied_file, train_on_prompt):
    def setup(packing):
        config = make_config(varied_file, data={"packing": packing, "train_on_prompt": train_on_prompt,
                                                "max_length": 160},
                             train={"batch_size": 2, "grad_accum": 8})
        recipe = make_recipe(config)
        randomise_lora_b(recipe.model)
        return recipe

    padded, packed = setup(False), setup(True)
    padded_window, packed_window = only_window(padded), only_window(packed)
    # Packing really did put several rows in one sequence.
    assert len(packed_window) < len(padded_window)
    assert any(b.attention_mask.ndim == 4 for b in packed_window)
    trained = sum(b.num_trained for b in padded_window)
    assert sum(b.num_trained for b in packed_window) == trained
    assert sum(b.num_tokens for b in packed_window) == sum(b.num_tokens for b in padded_window)

    padded_loss, padded_grads = gradients(padded, padded_window)
    packed_loss, packed_grads = gradients(packed, packed_window)
    assert packed_loss * trained == pytest.approx(padded_loss * trained, rel=1e-6)
    assert_same_grads(packed_grads, padded_grads)

    # Meaningful: with position ids and a plain padding mask (causal attention over the whole pack) the samples
    # see each other and the loss moves far beyond the tolerance above.
    with torch.no_grad():
        isolated = sum(float(engine_step.lm_loss_sum(packed.model, b, 1024)) for b in packed_window)
        leaky = 0.0
        for b in packed_window:
            plain = Batch(b.input_ids, b.targets, torch.ones_like(b.input_ids), b.position_ids, b.num_tokens,
                          b.num_trained)
            leaky += float(engine_step.lm_loss_sum(packed.model, plain, 1024))
    assert isolated == pytest.approx(padded_loss * trained, rel=1e-6)
    assert abs(leaky - isolated) > 1e-5 * isolated


def test_packed_shuffled_epochs_are_all_trained(make_config, tmp_path):
    # Rows are packed after shuffling, so each epoch can have a different number of packs; the planned number of
    # steps must follow, or the run ends early and silently skips rows of its last epoch.
    rows = write_jsonl(tmp_path / "rows.jsonl", VARIED_ROWS * 3)
    config = make_config(rows, data={"packing": True, "max_length": 100},
                         train={"batch_size": 1, "epochs": 3, "seed": 0, "log_every": 1000})
    recipe = make_recipe(config)
    unshuffled = len(recipe.epoch_batches(shuffle=False))
    summary = recipe.train()
    epoch_tokens = sum(len(e.input_ids) for e in recipe.data.train)
    assert summary["tokens"] == 3 * epoch_tokens
    assert summary["steps"] == recipe.total_steps != 3 * unshuffled  # seed 0 packs worse than the file order
    assert recipe.history[-1]["step"] == recipe.total_steps  # the last step is always logged


def test_bf16_autocast_step_stays_close_to_fp32(make_config, varied_file):
    def run(mixed_precision):
        recipe = make_recipe(make_config(varied_file, train={"batch_size": 4, "grad_accum": 2,
                                                             "mixed_precision": mixed_precision}))
        randomise_lora_b(recipe.model)
        return gradients(recipe, only_window(recipe))

    (loss32, grads32), (loss16, grads16) = run("no"), run("bf16")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert all(g.dtype == torch.float32 for g in grads16.values())
    assert relative_difference(grads16, grads32) < 0.03


def test_evaluate_loss_is_the_token_mean_and_restores_training_mode(make_config, varied_file):
    recipe = make_recipe(make_config(varied_file, lora={"enabled": False}, train={"batch_size": 3}))
    batches = recipe.epoch_batches(shuffle=False)
    with torch.no_grad():
        total = sum(float(engine_step.lm_loss_sum(recipe.model, b, 1024)) for b in batches)
    trained = sum(b.num_trained for b in batches)
    result = engine_step.evaluate_loss(recipe.model, batches, recipe.device)
    assert result["tokens"] == trained
    assert result["loss"] == pytest.approx(total / trained, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert recipe.model.training
    assert all(p.grad is None for p in recipe.model.parameters())


def test_bad_data_is_reported_before_the_model_is_looked_up(make_config, tmp_path):
    rows = write_jsonl(tmp_path / "bad.jsonl", VARIED_ROWS[:2] + [{"messages": [{"role": "user", "content": 3}]}])
    config = make_config(rows, model={"name_or_path": str(tmp_path / "no-such-model")})
    with pytest.raises(DataError, match="row 3"):
        make_recipe(config)


def test_held_out_rows_are_counted_in_their_own_report(make_config, qa_file):
    recipe = make_recipe(make_config(qa_file, data={"val_fraction": 0.25}))
    train, held_out = recipe.data.reports
    assert (train.rows, train.kept, held_out.rows, held_out.kept) == (18, 18, 6, 6)
    assert len(recipe.data.train) == 18 and len(recipe.data.validation) == 6


# ---------------------------------------------------------------------------------------------- pad == eos
def _real_length(batch: Batch, row: int) -> int:
    return int(batch.attention_mask[row].sum())


def test_padding_with_eos_still_trains_the_end_of_turn_token(make_config, varied_file, tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the hazard this test is about
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    recipe = make_recipe(make_config(varied_file, train={"batch_size": 8}))
    (batch,) = only_window(recipe)
    lengths = [_real_length(batch, i) for i in range(batch.input_ids.shape[0])]
    assert len(set(lengths)) > 1, "the batch should need padding"
    pad = tokenizer.pad_token_id
    for row, n in enumerate(lengths):
        ids, targets = batch.input_ids[row].tolist(), batch.targets[row].tolist()
        # SmolLM2's template ends a turn with "<|im_end|>\n": the end-of-turn token is trained, the newline not.
        assert ids[n - 2] == end_of_turn and tokenizer.decode([ids[n - 1]]) == "\n"
        assert targets[n - 3] == end_of_turn, f"row {row}: the response does not learn to stop"
        assert targets[n - 2] == IGNORE_INDEX and targets[n - 1] == IGNORE_INDEX
        # Padding is the same id as EOS, but has no target and predicts nothing.
        assert all(i == pad for i in ids[n:])
        assert all(t == IGNORE_INDEX for t in targets[n:])
    assert batch.num_trained == int((batch.targets != IGNORE_INDEX).sum())


def test_padding_with_eos_plain_text_rows_train_their_final_eos(make_config, tmp_path, tokenizer):
    rows = [{"text": " ".join(WORDS[: 2 + 3 * i])} for i in range(4)]
    recipe = make_recipe(make_config(write_jsonl(tmp_path / "text.jsonl", rows), data={"format": "text"},
                                     train={"batch_size": 4}))
    (batch,) = only_window(recipe)
    eos = tokenizer.eos_token_id
    for row in range(4):
        n = _real_length(batch, row)
        assert batch.input_ids[row, n - 1] == eos
        assert batch.targets[row, n - 2] == eos
        assert (batch.targets[row, n - 1:] == IGNORE_INDEX).all()
    assert (batch.targets[batch.attention_mask == 0] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------- pinned and repeatable
# Three LoRA SFT steps on the tiny fixed-seed model (conftest.build_tiny_model, seed 0) and conftest.QA_ROWS.
# If these move, the numerics changed: the loss, the accumulation, the optimiser, the schedule, the LoRA init,
# or the tokens and masks (template, tokenisation). Re-pin only after explaining why they had to move.
PINNED_LOSSES = [10.81495762, 10.70624733, 10.55993366]
# Step 1 is the base model's loss (LoRA's B starts at 0); steps 2 and 3 follow two AdamW updates at lr 1e-2.
PINNED_GRAD_NORMS = [0.43670020, 0.61776805, 0.59375232]


def _pinned_run(make_config, qa_file) -> list[tuple[float, float]]:
    config = make_config(qa_file, train={"max_steps": 3, "lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"})
    recipe = make_recipe(config)
    recipe.train()
    return [(record["loss"], record["grad_norm"]) for record in recipe.history if "loss" in record]


def test_pinned_losses_and_repeatability(make_config, qa_file):
    first = _pinned_run(make_config, qa_file)
    assert [loss for loss, _ in first] == pytest.approx(PINNED_LOSSES, abs=1e-4)
    assert [norm for _, norm in first] == pytest.approx(PINNED_GRAD_NORMS, abs=1e-4)
    assert _pinned_run(make_config, qa_file) == first  # same seed, bit for bit


# -------------------------------------------------------------------------------------- schedule and optimiser
@pytest.mark.parametrize("kind, step, expected", [
    # warmup 2 of 10 steps: 1/3, 2/3, then the peak for every kind
    ("constant", 0, 1 / 3), ("linear", 1, 2 / 3), ("cosine", 0, 1 / 3), ("cosine", 2, 1.0), ("linear", 2, 1.0),
    ("constant", 9, 1.0),
    # linear: 1 - (step - 2) / 8
    ("linear", 6, 0.5), ("linear", 9, 0.125), ("linear", 10, 0.0),
    # cosine: (1 + cos(pi * (step - 2) / 8)) / 2
    ("cosine", 4, 0.5 * (1 + math.cos(math.pi / 4))), ("cosine", 6, 0.5), ("cosine", 10, 0.0),
])
def test_lr_factor_exact_values(kind, step, expected):
    assert lr_factor(step, 10, 2, kind) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_without_warmup_starts_at_peak():
    for kind in ("constant", "linear", "cosine"):
        assert lr_factor(0, 5, 0, kind) == 1.0


def test_warmup_steps_from_ratio_or_explicit():
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 25) == 3  # ceil(2.5)
    assert warmup_steps(TrainConfig(warmup_ratio=0.0), 25) == 0
    assert warmup_steps(TrainConfig(warmup_ratio=0.5, warmup_steps=4), 25) == 4


def test_scheduler_drives_the_optimizer_learning_rate():
    model = torch.nn.Linear(3, 3)
    config = TrainConfig(lr=0.1, scheduler="linear", warmup_steps=1)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=5)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.1, 0.075, 0.05, 0.025])


def test_optimizer_excludes_one_dimensional_parameters_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2, bias=False))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, lr=1e-3, betas=[0.8, 0.9]))
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] == 0.1]
    undecayed = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert [p.shape for p in decayed[0]["params"]] == [torch.Size([8, 4])]
    assert sorted(p.shape for p in undecayed[0]["params"]) == [torch.Size([8])] * 3  # bias, norm weight, norm bias
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert all(p is not model[2].weight for g in optimizer.param_groups for p in g["params"])


def test_logged_lr_is_the_rate_the_step_trained_with(make_config, qa_file):
    config = make_config(qa_file, train={"max_steps": 3, "lr": 1e-2, "warmup_steps": 2, "scheduler": "constant"})
    recipe = make_recipe(config)
    recipe.train()
    assert [r["lr"] for r in recipe.history] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])


# ------------------------------------------------------------------------------------------------- NaN guard
def test_non_finite_loss_stops_the_run_without_saving(make_config, qa_file, monkeypatch, tmp_path):
    poison_loss(monkeypatch, 2)
    config = make_config(qa_file, train={"max_steps": 4})
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    assert not (run_dir / RUN_MARKER).exists()
    assert not (run_dir / "adapter").exists()
    # The stopped run is still recognisably tuneforge's, so it can be replaced.
    monkeypatch.undo()  # the real loss again
    summary = run_training(config, overwrite=True, log=quiet)
    assert summary["steps"] == 4 and (run_dir / RUN_MARKER).exists()


# ---------------------------------------------------------------------------------------------- run directory
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}


def test_run_directory_contents_and_overwrite_rules(make_config, qa_file, tmp_path):
    config = make_config(qa_file, train={"max_steps": 2, "log_every": 1}, data={"val_fraction": 0.25})
    summary = run_training(config, log=quiet)
    run_dir = tmp_path / "run"
    assert summary["run_dir"] == str(run_dir) and summary["steps"] == 2
    assert math.isfinite(summary["val_loss"])
    for name in ("config.yaml", RUN_MARKER, "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "tokenizer/tokenizer_config.json", "metrics.jsonl", "data_report.json"):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.yaml") == config
    marker = json.loads((run_dir / RUN_MARKER).read_text())
    assert marker["kind"] == "lora" and marker["method"] == "sft"

    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for record in train_records:
        assert METRIC_KEYS <= record.keys()
        assert all(math.isfinite(record[k]) for k in METRIC_KEYS)
        assert record["tokens"] > 0 and record["tokens_per_s"] > 0
    assert train_records[1]["tokens"] > train_records[0]["tokens"]
    assert any("val_loss" in r for r in records)

    # An existing run is refused, and nothing in it is touched.
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already exists"):
        run_training(config, log=quiet)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    # With overwrite the old run is replaced, not merged into.
    (run_dir / "stale.txt").write_text("from the old run")
    run_training(make_config(qa_file, train={"max_steps": 1}), overwrite=True, log=quiet)
    assert not (run_dir / "stale.txt").exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1]


def test_overwrite_never_deletes_a_folder_tuneforge_did_not_make(make_config, qa_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a tuneforge run directory"):
        run_training(make_config(qa_file, train={"max_steps": 1}), overwrite=True, log=quiet)
    assert (run_dir / "precious.txt").read_text() == "keep me"

    run_dir.rename(tmp_path / "moved")
    run_dir.write_text("a file, not a folder")
    for overwrite in (False, True):
        with pytest.raises(UserError):
            run_training(make_config(qa_file, train={"max_steps": 1}), overwrite=overwrite, log=quiet)
    assert run_dir.read_text() == "a file, not a folder"


def test_full_fine_tuning_from_a_lora_run_trains_the_merged_model(make_config, qa_file, tmp_path):
    lora_dir = tmp_path / "lora-run"
    run_training(make_config(qa_file, train={"max_steps": 1, "output_dir": str(lora_dir)}), log=quiet)
    config = make_config(qa_file, model={"name_or_path": str(lora_dir)}, lora={"enabled": False},
                         train={"max_steps": 1})
    recipe = make_recipe(config)
    assert not is_peft(recipe.model)
    assert all(p.requires_grad for p in recipe.model.parameters())
    assert recipe.train()["steps"] == 1

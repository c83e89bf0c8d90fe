"""Preference recipes (DPO family, SimPO, ORPO, KTO, reward model) on the tiny model: step-0 sanity, parity of the
recipe's loss with a direct recomputation from full logits, the reference model, precomputed reference, batch
geometry invariance, reward read at the last real token, resume, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import config_from_dict
from tuneforge.engine.trainer import Trainer, run_training
from tuneforge.losses import (bradley_terry_loss, dpo_loss, kto_loss, orpo_odds_ratio_loss, sequence_logprobs,
                              simpo_loss)

PAIRS = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is {['red', 'blue', 'green'][i % 3]}.",
          "rejected": f"Well, let me think, item {i} might be, I believe, some colour or other, perhaps."}
         for i in range(16)]
UNPAIRED = [{"prompt": f"What colour is item {i}?",
             "completion": f"Item {i} is red." if i % 3 else f"Item {i}, hmm, who knows really.",
             "label": bool(i % 3)} for i in range(16)]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


@pytest.fixture
def unpaired_file(tmp_path):
    return write_jsonl(tmp_path / "kto.jsonl", UNPAIRED)


@pytest.fixture
def pref_config(tiny_model_dir, tmp_path, pairs_file, unpaired_file):
    """pref_config(method, **sections) -> RunConfig on the tiny model (pairs, or unpaired rows for kto)."""

    def make(method, **sections):
        values = {
            "method": method,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(unpaired_file if method == "kto" else pairs_file), "max_length": 64,
                     "shuffle": False},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"output_dir": str(tmp_path / f"run-{method}"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                      "seed": 0, "mixed_precision": "no", "warmup_ratio": 0.0, "scheduler": "constant"},
        }
        for section, updates in sections.items():
            if isinstance(updates, dict):
                values.setdefault(section, {}).update(updates)
            else:
                values[section] = updates
        return config_from_dict(values)

    return make


def quiet(message):
    pass


def ready(config) -> Trainer:
    trainer = Trainer(config, log=quiet, show_progress=False, run_dir=False)
    trainer.setup()
    return trainer


def separate_rows(trainer, index):
    """Micro-batch ``index`` (unshuffled) as 2B separate rows, chosen then rejected: the plain layout."""
    from tuneforge.data.preference import make_preference_batches

    return make_preference_batches(trainer.data.train, trainer.config.train.batch_size,
                                   trainer.tokenizer.pad_token_id)[index].sequences


def stat_means(stats) -> dict[str, float]:
    """sum / weight of each named ``LossTerms`` statistic."""
    return {name: (entry[0] / entry[1]).item() for name, entry in stats.items()}


def full_logit_logprobs(model, sequences):
    """(2B,) summed and mean response log-probs from the model's full logits: the plain reference computation."""
    logits = model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask,
                   position_ids=sequences.position_ids).logits
    return sequence_logprobs(logits, sequences.targets), sequence_logprobs(logits, sequences.targets, average=True)


# --------------------------------------------------------------------------------------------------- step 0
@pytest.mark.parametrize("lora", [True, False])
def test_dpo_step_zero_is_ln2_with_zero_margins(pref_config, lora):
    trainer = ready(pref_config("dpo", lora={"enabled": lora}))
    batch = trainer.epoch_batches(shuffle=False)[0]
    with torch.no_grad():
        out = trainer.wrapped(batch)
    pairs = batch.global_pairs
    assert out.loss_sum.item() / pairs == pytest.approx(math.log(2), abs=1e-6)
    stats = stat_means(out.stats)
    assert stats["rewards_chosen"] == 0 and stats["rewards_rejected"] == 0 and stats["reward_margin"] == 0
    # And the logged first step says the same.
    loss, _ = trainer.train_step([batch])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------- loss parity
@pytest.mark.parametrize("method,sections", [
    ("dpo", {}), ("dpo", {"dpo": {"loss": "ipo"}}), ("dpo", {"dpo": {"loss": "robust", "label_smoothing": 0.2}}),
    ("dpo", {"dpo": {"loss": "hinge"}}), ("simpo", {}), ("orpo", {}), ("reward", {"reward": {"center_coefficient": 0.1}}),
])
def test_recipe_loss_matches_direct_recomputation(pref_config, method, sections):
    """After a few steps (policy != reference), the recipe's step loss equals the paper's loss recomputed from the
    full logits of the policy and of the reference (a fresh copy of the starting model)."""
    config = pref_config(method, **sections)
    trainer = ready(config)
    batches = trainer.epoch_batches(shuffle=False)
    for batch in batches[:3]:
        trainer.train_step([batch])
    batch = batches[0]
    loss = trainer.compute_gradients([batch]).item()
    trainer.optimizer.zero_grad(set_to_none=True)
    pairs = batch.num_pairs
    seq = separate_rows(trainer, 0)
    with torch.no_grad():
        if method == "reward":
            from tuneforge.models.reward import reward_scores

            scores = reward_scores(trainer.model, seq.input_ids, seq.attention_mask, seq.position_ids)
            expected = bradley_terry_loss(scores[:pairs], scores[pairs:], None, 0.1).mean()
        else:
            sums, means = full_logit_logprobs(trainer.model, seq)
            if method == "dpo":
                with trainer.model.disable_adapter():
                    ref_sums, ref_means = full_logit_logprobs(trainer.model, seq)
                cfg = config.dpo
                use = (means, ref_means) if cfg.loss == "ipo" else (sums, ref_sums)
                expected = dpo_loss(use[0][:pairs], use[0][pairs:], use[1][:pairs], use[1][pairs:], cfg.beta, cfg.loss,
                                    cfg.label_smoothing).losses.mean()
            elif method == "simpo":
                expected = simpo_loss(means[:pairs], means[pairs:], config.simpo.beta, config.simpo.gamma).losses.mean()
            else:
                chosen_tokens = (seq.targets[:pairs] != -100).sum()
                expected = (orpo_odds_ratio_loss(means[:pairs], means[pairs:], config.orpo.lam).mean()
                            - sums[:pairs].sum() / chosen_tokens)
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_kto_loss_matches_direct_recomputation(pref_config):
    config = pref_config("kto")
    trainer = ready(config)
    batches = trainer.epoch_batches(shuffle=False)
    for batch in batches[:2]:
        trainer.train_step([batch])
    batch = batches[1]
    loss = trainer.compute_gradients([batch]).item()
    trainer.optimizer.zero_grad(set_to_none=True)
    count, seq = batch.num_examples, batch.sequences
    with torch.no_grad():
        policy, _ = full_logit_logprobs(trainer.model, seq)
        with trainer.model.disable_adapter():
            ref, _ = full_logit_logprobs(trainer.model, seq)
    z0 = (policy[count:] - ref[count:]).mean()
    cfg = config.kto
    expected = kto_loss(policy[:count], ref[:count], batch.desirable, z0, cfg.beta, cfg.desirable_weight,
                        cfg.undesirable_weight).losses.mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert batch.desirable.any() and not batch.desirable.all()  # both branches of the loss were exercised


# ------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("lora", [True, False])
def test_shared_prompt_layout_equals_two_rows_per_pair(pref_config, lora):
    """One row per pair (prompt once, rejected masked from chosen) gives the log-probs and the gradients of the
    two-row layout, with fewer tokens through the model."""
    results = {}
    for shared in (True, False):
        trainer = ready(pref_config("dpo", lora={"enabled": lora}, data={"shared_prompt": shared},
                                    dpo={"precompute_ref": True}))
        trainer.train_step([trainer.epoch_batches(shuffle=False)[1]])  # move the policy off the reference
        batch = trainer.epoch_batches(shuffle=False)[0]
        logps = trainer.recipe.logprobs(trainer.model, batch).sums.detach()
        trainer.compute_gradients([batch])
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[shared] = (batch.sequences.input_ids.shape, logps, grads)
    (shared_shape, shared_logps, shared_grads), (rows_shape, row_logps, row_grads) = results[True], results[False]
    assert shared_shape[0] == rows_shape[0] // 2 and shared_shape[1] < 2 * rows_shape[1]
    torch.testing.assert_close(shared_logps, row_logps, atol=1e-4, rtol=1e-5)
    assert shared_grads.keys() == row_grads.keys()
    for name in row_grads:
        torch.testing.assert_close(shared_grads[name], row_grads[name], atol=1e-5, rtol=1e-3)


def test_shared_prompt_mask_holds_under_the_eager_kernel(pref_config):
    """The eager kernel adds a 4-D mask to the scores, so the shared-prompt mask reaches it as 0 / most-negative
    (engine.step.kernel_mask): the log-probs equal those of two plain rows per pair under SDPA."""
    logps = {}
    for kernel, shared in (("eager", True), ("sdpa", False)):
        trainer = ready(pref_config("dpo", model={"attn_implementation": kernel}, data={"shared_prompt": shared},
                                    dpo={"precompute_ref": True}))
        with torch.no_grad():
            logps[kernel] = trainer.recipe.logprobs(trainer.model, trainer.epoch_batches(shuffle=False)[0]).sums
    torch.testing.assert_close(logps["eager"], logps["sdpa"], atol=1e-4, rtol=1e-5)


def test_lora_reference_is_the_starting_model_without_a_copy(pref_config, tiny_model_dir):
    """After training, the adapter-disabled policy still gives the starting model's log-probs, and no second copy
    of the model exists."""
    from transformers import AutoModelForCausalLM

    trainer = ready(pref_config("dpo", train={"lr": 1e-2}))
    batches = trainer.epoch_batches(shuffle=False)
    for batch in batches:
        trainer.train_step([batch])
    assert trainer.recipe.reference.copy is None
    seq = separate_rows(trainer, 0)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected, _ = full_logit_logprobs(start, seq)
        trained, _ = full_logit_logprobs(trainer.model, seq)
    reference = trainer.recipe.reference_logprobs(trainer.model, batches[0]).sums
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-5)
    assert (trained - expected).abs().max() > 1e-2  # the policy itself did move


@pytest.mark.parametrize("lora", [True, False])
def test_precomputed_reference_trains_like_the_inline_reference(pref_config, lora):
    """Same losses step by step with reference log-probs computed once up front; full fine-tuning then keeps no
    frozen copy of the model."""
    losses = {}
    for precompute in (False, True):
        trainer = ready(pref_config("dpo", lora={"enabled": lora}, dpo={"precompute_ref": precompute}))
        assert (trainer.recipe.reference.copy is None) == (lora or precompute)
        batches = trainer.epoch_batches(shuffle=False)
        assert (batches[0].ref_chosen is not None) == precompute
        losses[precompute] = [trainer.train_step([b])[0].item() for b in batches]
    assert losses[True] == pytest.approx(losses[False], abs=2e-5)
    assert losses[False][-1] < losses[False][0]


# ------------------------------------------------------------------------------------- batch geometry
@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "reward"])
def test_batch_4_equals_batch_1_times_accumulation_4(pref_config, method):
    """The step's gradient is the mean over its pairs (ORPO's NLL: over its chosen tokens), whatever the split."""
    grads = {}
    for batch_size, accum in ((4, 1), (1, 4), (2, 2)):
        trainer = ready(pref_config(method, train={"batch_size": batch_size, "grad_accum": accum}))
        batches = trainer.epoch_batches(shuffle=False)
        trainer.compute_gradients([batches[i] for i in range(accum)])
        grads[batch_size] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads[4].keys() == grads[1].keys() and grads[4]
    for name in grads[4]:
        torch.testing.assert_close(grads[1][name], grads[4][name], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(grads[2][name], grads[4][name], atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------ reward model
def test_reward_is_read_at_the_last_real_token_when_pad_is_eos(tiny_model_dir, tokenizer):
    """pad == eos and an EOS inside the prompt: the padded batch scores each row exactly as the row alone, and
    transformers' own pooling (first pad id) would read another position."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models.reward import reward_scores

    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    rows = [[5, 6, eos, 7, 8, 9, eos], [11, 12, 13, eos]]  # both end in EOS; the first has one in its prompt
    width = max(map(len, rows))
    ids = torch.full((2, width), eos)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = reward_scores(model, ids, mask, positions)
        alone = torch.stack([reward_scores(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long),
                                           torch.arange(len(r))[None]) for r in rows]).squeeze(1)
        # What the head says at every position of row 0: the last real one is what we read.
        hidden = model.model(input_ids=torch.tensor([rows[0]])).last_hidden_state
        per_position = model.score(hidden)[0, :, 0]
        hf_pooled = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert batched[0].item() == pytest.approx(per_position[-1].item(), abs=1e-5)
    assert abs(hf_pooled[0].item() - batched[0].item()) > 1e-4  # transformers stops at the EOS in the prompt


def test_reward_run_scores_from_the_cli_like_training(pref_config, tmp_path, pairs_file, capsys):
    from tuneforge.cli import main
    from tuneforge.rewards.scoring import RewardScorer

    config = pref_config("reward", train={"epochs": 3, "lr": 3e-3}, data={"val_fraction": 0.25})
    summary = run_training(config, log=quiet)
    assert summary["val_accuracy"] == 1.0 and summary["val_reward_margin"] > 0
    out = tmp_path / "scores.jsonl"
    assert main(["score", summary["run_dir"], "--data", str(pairs_file), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(PAIRS) and scored[0]["prompt"] == PAIRS[0]["prompt"]
    right = sum(r["chosen_score"] > r["rejected_score"] for r in scored)
    assert right >= 14
    assert f"{right}/{len(PAIRS)} pairs" in capsys.readouterr().err
    # The saved model (PEFT adapter + score head) loads again and scores one conversation alone the same way.
    scorer = RewardScorer.load(summary["run_dir"])
    from tuneforge.data.formats import Conversation, Message

    conversation = Conversation([Message("user", PAIRS[0]["prompt"]), Message("assistant", PAIRS[0]["chosen"])])
    assert scorer.score([conversation])[0] == pytest.approx(scored[0]["chosen_score"], abs=1e-5)
    assert main(["score", summary["run_dir"], "--data", str(pairs_file), "--out", str(out)]) == 2  # never overwrites


# ------------------------------------------------------------------------------------------ CLI and runs
@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo", "kto", "reward"])
def test_each_method_trains_from_the_cli(pref_config, method, tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    config = pref_config(method, train={"epochs": 2}, data={"val_fraction": 0.25})
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and summary["stop_reason"] == "completed"
    records = [json.loads(line) for line in (tmp_path / f"run-{method}" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 * 3  # 12 training rows / batch 4, two epochs
    assert steps[-1]["loss"] < steps[0]["loss"]
    key = "accuracy" if method == "reward" else "logps" if method == "kto" else "reward_accuracy"
    assert key in steps[0]
    assert any(f"val_{key}" in r for r in records)
    marker = json.loads((tmp_path / f"run-{method}" / "tuneforge_run.json").read_text())
    assert marker["method"] == method


def test_dpo_from_a_lora_sft_run_uses_that_run_as_reference(pref_config, make_config, qa_file, tmp_path):
    """The SFT adapter is folded into the base, so step 0 is ln 2 against the SFT model (not the raw base), and the
    saved DPO run loads as base + SFT adapter + DPO adapter."""
    from tuneforge.generation import Generator

    sft = run_training(make_config(qa_file, train={"output_dir": str(tmp_path / "sft"), "epochs": 2}), log=quiet)
    config = pref_config("dpo", model={"name_or_path": sft["run_dir"]}, train={"max_steps": 2})
    trainer = ready(config)
    batch = trainer.epoch_batches(shuffle=False)[0]
    seq = separate_rows(trainer, 0)
    sft_model = Generator.load(sft["run_dir"]).model
    with torch.no_grad():
        sft_logps, _ = full_logit_logprobs(sft_model, seq)
        reference = trainer.recipe.reference_logprobs(trainer.model, batch).sums
    assert trainer.train_step([batch])[0].item() == pytest.approx(math.log(2), abs=1e-6)
    torch.testing.assert_close(reference, sft_logps, atol=1e-4, rtol=1e-5)
    summary = run_training(config, log=quiet)
    loaded = Generator.load(summary["run_dir"]).model
    trainer.train_step([trainer.epoch_batches(shuffle=False)[1]])
    with torch.no_grad():
        torch.testing.assert_close(full_logit_logprobs(loaded, seq)[0], full_logit_logprobs(trainer.model, seq)[0],
                                   atol=1e-4, rtol=1e-5)


def test_dpo_resume_continues_exactly(pref_config):
    """Full fine-tuning with precomputed reference: resuming recomputes the reference from the *starting* model
    (not the resumed weights) and continues with the same losses."""
    make = lambda steps: pref_config("dpo", lora={"enabled": False}, dpo={"precompute_ref": True},  # noqa: E731
                                     train={"epochs": 3, "max_steps": steps}, save={"every": 2})
    whole = run_training(make(6), log=quiet)
    records = [json.loads(line) for line in open(f"{whole['run_dir']}/metrics.jsonl")]
    uninterrupted = [r["loss"] for r in records if "loss" in r]
    run_training(make(3), overwrite=True, log=quiet)
    resumed = run_training(make(6), log=quiet, resume=True)
    records = [json.loads(line) for line in open(f"{resumed['run_dir']}/metrics.jsonl")]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert [losses[s] for s in range(1, 7)] == pytest.approx(uninterrupted, abs=1e-6)


def test_preview_shows_a_pair_with_its_scored_spans(pref_config, tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(pref_config("dpo").to_dict()))
    assert main(["data", "preview", str(path), "--n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[Item 0 is red." in out and "[[Well, let me think" in out
    assert "[[What colour" not in out


def test_config_rejects_options_that_make_no_sense_for_preference(pref_config):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="packing"):
        pref_config("dpo", data={"packing": True})
    with pytest.raises(ConfigError, match="label_smoothing"):
        pref_config("dpo", dpo={"label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="method"):
        pref_config("ppo")


def test_reward_margin_from_the_rows_enters_the_loss(pref_config, tmp_path):
    """Rows with ``margin`` give -log sigmoid(r_c - r_r - m) (Llama 2); without it the plain Bradley-Terry loss."""
    from tuneforge.models.reward import reward_scores

    margins = [0.5 * (i % 4) for i in range(len(PAIRS))]
    path = write_jsonl(tmp_path / "margins.jsonl", [{**row, "margin": m} for row, m in zip(PAIRS, margins)])
    trainer = ready(pref_config("reward", data={"train": str(path)}))
    batch = trainer.epoch_batches(shuffle=False)[1]
    torch.testing.assert_close(batch.margins, torch.tensor(margins[4:8]))
    loss = trainer.compute_gradients([batch]).item()
    seq = batch.sequences
    with torch.no_grad():
        scores = reward_scores(trainer.model, seq.input_ids, seq.attention_mask, seq.position_ids)
    expected = bradley_terry_loss(scores[:4], scores[4:], batch.margins).mean().item()
    assert loss == pytest.approx(expected, rel=1e-6)
    assert loss != pytest.approx(bradley_terry_loss(scores[:4], scores[4:]).mean().item(), rel=1e-3)


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_qlora_preference_training_on_a_4bit_base(pref_config, method):
    """QLoRA for preference methods: the base is 4-bit, only adapters (and the reward head) train; DPO's
    adapter-disabled reference is the quantized start (step 0 is ln 2) and the loss goes down."""
    pytest.importorskip("bitsandbytes")
    config = pref_config(method, model={"load_in": "4bit", "compute_dtype": "float32"}, train={"epochs": 2})
    trainer = ready(config)
    kinds = {type(m).__name__ for m in trainer.model.modules()}
    assert "Linear4bit" in kinds
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    batches = trainer.epoch_batches(shuffle=False)
    losses = [trainer.train_step([batches[i % len(batches)]])[0].item() for i in range(6)]
    if method == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reward", "dpo", "simpo", "orpo", "kto"])
def test_each_method_trains_on_the_default_model(method, tmp_path):
    """A few steps of each method on the embedded SmolLM2-135M-Instruct with the demo's pairs (make test-all)."""
    from pathlib import Path

    pairs = Path(__file__).parent.parent / "examples" / "data" / "concise_pairs_train.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()[:8]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = config_from_dict({
        "method": method, "model": {"name_or_path": "default"},
        "data": {"train": str(data), "max_length": 256, "shuffle": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "lr": 1e-4, "seed": 0,
                  "warmup_ratio": 0.0, "scheduler": "constant", "mixed_precision": "no"},
    })
    summary = run_training(config, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert summary["steps"] == 4 and all(math.isfinite(v) for v in losses)
    if method == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)

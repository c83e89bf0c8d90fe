"""On-policy distillation (``method: gkd``) on the tiny models: the step's loss against the generalised JSD
recomputed from both models' full logits (dataset responses and the student's own samples), zero when the student
is the teacher, batch geometry, the mixture of on- and off-policy batches, exact resume, the teacher (a LoRA run, a
padded head, another vocabulary refused before any model loads), the data rules, the CLI, the Python API and the
bench."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

import tuneforge as tf
from conftest import QA_ROWS, TINY, build_tiny_model, write_jsonl
from test_engine_resume import adapter, assert_same_weights, complete_steps, describe, run_child
from test_losses_distill import direct_divergences
from test_online_resume import step_records
from tuneforge.bench import run_bench
from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.trainer import Trainer
from tuneforge.errors import ConfigError, DataError
from tuneforge.generation import load_for_inference
from tuneforge.losses import IGNORE_INDEX
from tuneforge.models.loading import resolve_model
from tuneforge.recipes._online import SAMPLING_STATE_KEY

PROMPTS = [{"prompt": f"What is item {i}?"} for i in range(12)]
HELD_OUT = [{"prompt": f"Describe item {i}."} for i in range(3)]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """Another tiny Llama (other weights) with the student's tokenizer."""
    out = tmp_path_factory.mktemp("teacher")
    build_tiny_model(tokenizer, seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gkd_values(student: Path, teacher: Path, train_file: Path, root: Path, **sections) -> dict:
    values = {
        "method": "gkd",
        "model": {"name_or_path": str(student)},
        "data": {"train": str(train_file), "max_length": 128, "shuffle": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(root / "run"), "epochs": 1, "batch_size": 4, "lr": 1e-2, "log_every": 1,
                  "seed": 0, "mixed_precision": "no", "scheduler": "constant", "warmup_ratio": 0.0},
        "gkd": {"teacher": str(teacher), "max_new_tokens": 8},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return values


def ready(values: dict) -> Trainer:
    trainer = Trainer(config_from_dict(values), run_dir=False, log=lambda message: None, show_progress=False)
    trainer.setup()
    return trainer


def loss_by_hand(trainer: Trainer, batches) -> float:
    """The generalised JSD per response token of ``batches``, from the full logits of both models."""
    section = trainer.config.gkd
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids)
            selected = batch.targets != IGNORE_INDEX
            student = trainer.model(**inputs).logits[selected]
            teacher = trainer.recipe.teacher.model(**inputs).logits[selected]
            total += float(direct_divergences(student, teacher, section.beta, section.temperature)["jsd"].sum())
            tokens += int(selected.sum())
    return total / tokens


# ----------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_step_loss_is_the_generalized_jsd_of_both_models_full_logits(tiny_model_dir, teacher_dir, tmp_path, beta):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:8])
    trainer = ready(gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, gkd={"beta": beta, "lmbda": 0.0,
                                                                                   "temperature": 0.8},
                               train={"grad_accum": 2, "batch_size": 2}))
    window = [item.responses for item in trainer.epoch_batches(shuffle=False)[:2]]
    want = loss_by_hand(trainer, window)
    got = float(trainer.compute_gradients(window))
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-4)
    # Off-policy, the distilled positions are exactly the SFT ones: the assistant's tokens.
    assert [b.num_trained for b in window] == [b.global_trained for b in window]


def test_on_policy_batches_are_the_students_samples_and_their_loss_is_the_same_divergence(tiny_model_dir,
                                                                                          teacher_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    trainer = ready(gkd_values(tiny_model_dir, teacher_dir, prompts, tmp_path, gkd={"lmbda": 1.0}))
    recipe = trainer.recipe
    item = trainer.epoch_batches(shuffle=False)[0]
    assert item.responses is None  # prompt rows: nothing to train on but the student's own answers
    batch = recipe.sample(item.prompts, seed=5)
    stops = set(recipe.engine.stop_ids)
    for row, prompt in enumerate(item.prompts):
        ids, targets = batch.input_ids[row], batch.targets[row]
        assert ids[:len(prompt)].tolist() == prompt
        response = ids[len(prompt):len(prompt) + int((targets != IGNORE_INDEX).sum())].tolist()
        # Every sampled token is a target (predicted from the position before it), and nothing else is.
        assert targets[len(prompt) - 1:len(prompt) - 1 + len(response)].tolist() == response
        assert len(response) == recipe.section.max_new_tokens or response[-1] in stops
    assert float(trainer.compute_gradients([batch])) == pytest.approx(loss_by_hand(trainer, [batch]), rel=1e-4)


def test_zero_loss_and_gradient_when_the_student_is_the_teacher(tiny_model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    # LoRA starts as the identity, so the student is its own base: the teacher.
    trainer = ready(gkd_values(tiny_model_dir, tiny_model_dir, rows, tmp_path, gkd={"lmbda": 0.0}))
    loss = trainer.compute_gradients([trainer.epoch_batches(shuffle=False)[0].responses])
    assert abs(float(loss)) < 1e-6
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-6


class Greedy:
    """An engine that answers greedily whatever the settings: the same responses in any batch geometry."""

    def __init__(self, engine):
        self.engine, self.stop_ids = engine, engine.stop_ids

    def sample(self, prompts, generations, settings):
        settings.greedy = True
        return self.engine.sample(prompts, generations, settings)

    def sync(self, model):
        pass


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["dataset", "on-policy"])
def test_one_batch_of_four_updates_as_two_of_two_with_accumulation(tiny_model_dir, teacher_dir, tmp_path, lmbda):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        trainer = ready(gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, gkd={"lmbda": lmbda},
                                   train={"batch_size": batch_size, "grad_accum": accum}))
        trainer.recipe.engine = Greedy(trainer.recipe.engine)
        losses = []

        def gradients_only(batches, trainer=trainer, losses=losses):  # the update without its optimiser step
            losses.append(trainer.compute_gradients(batches))
            return losses[-1], None

        trainer.recipe.train_step(trainer.epoch_batches(shuffle=False)[:accum], gradients_only)
        assert trainer.recipe.last_on_policy == [bool(lmbda)] * accum
        results.append((float(losses[0]), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                           if p.grad is not None}))
    (loss_one, one), (loss_two, two) = results
    assert loss_one == pytest.approx(loss_two, rel=1e-5) and loss_one > 0
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-7)


def test_lmbda_is_the_share_of_on_policy_batches_drawn_from_the_runs_generator(tiny_model_dir, teacher_dir,
                                                                                tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    trainer = ready(gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, gkd={"lmbda": 0.3}))
    recipe = trainer.recipe
    start = recipe.generator.get_state()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    draws = [recipe.draw() for _ in range(2000)]
    assert torch.equal(torch.get_rng_state(), before)  # the global stream (dropout, user code) is left alone
    assert abs(sum(on_policy for on_policy, _ in draws) / len(draws) - 0.3) < 0.04  # 4 standard deviations
    assert len({seed for _, seed in draws}) == len(draws)
    assert trainer.state.method_state[SAMPLING_STATE_KEY] == recipe.generator.get_state().tolist()
    # The same stream again from the same state; another rank makes the same choices with its own seeds.
    recipe.generator.set_state(start)
    trainer.dist.rank, trainer.dist.world_size = 1, 2
    other = [recipe.draw() for _ in range(2000)]
    assert [flag for flag, _ in other] == [flag for flag, _ in draws]
    assert all(a != b for (_, a), (_, b) in zip(other, draws))


# --------------------------------------------------------------------------------------------- exact resume
TOTAL_STEPS, KILL_STEP = 4, 2


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_model_dir, teacher_dir, tmp_path):
    """Shuffled rows with responses, half the micro-batches on-policy: the resumed run draws the same choices and
    samples (the generator travels with the checkpoint) and ends with the uninterrupted run's weights."""
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:6])
    values = gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, gkd={"lmbda": 0.5, "max_new_tokens": 6},
                        data={"shuffle": True}, train={"max_steps": TOTAL_STEPS, "batch_size": 1, "grad_accum": 2,
                                                       "seed": 3},
                        save={"every": 1, "keep_last": 10}, eval={"final": "last"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    reference = tmp_path / "reference"
    assert cli_main(["train", str(config), f"train.output_dir={reference}"]) == 0
    want = step_records(reference)
    assert [r["step"] for r in want] == list(range(1, TOTAL_STEPS + 1))
    assert len({r["on_policy"] for r in want}) > 1  # both kinds of batch were drawn: the choice is exercised

    run_dir = tmp_path / "run"
    killed = run_child("kill-after-save", KILL_STEP, "train", config, f"train.output_dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert complete_steps(run_dir) == list(range(1, KILL_STEP + 1))
    state = json.loads((ckpt.checkpoint_dir(run_dir, KILL_STEP) / "state.json").read_text())
    assert state["method_state"][SAMPLING_STATE_KEY]
    assert cli_main(["train", str(config), f"train.output_dir={run_dir}", "--resume"]) == 0
    assert step_records(run_dir) == want
    assert_same_weights(adapter(run_dir), adapter(reference), tol=0.0)


def test_two_ddp_ranks_match_one_process(tiny_model_dir, teacher_dir, tmp_path):
    """2 gloo ranks of half the batch train as one process: the same on-/off-policy choices (drawn the same
    whatever the number of ranks), losses normalised by the step's response tokens summed over ranks, and the
    greedy validation sharded. top_p ~ 0 keeps only the most likely token, so the samples do not depend on which
    rank's seed drew them."""
    from test_distributed import TOLERANCE, _losses, _one_process_and_two_ranks

    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:8])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    values = gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, data={"validation": str(held_out)},
                        gkd={"lmbda": 0.5, "top_p": 1e-6, "max_new_tokens": 4}, train={"epochs": 2},
                        eval={"at_start": True})
    single, multi = _one_process_and_two_ranks(values, tmp_path, "ddp")
    want, got = _losses(single), _losses(multi)
    assert len(want) == 4 + 3 and got == pytest.approx(want, rel=TOLERANCE, abs=TOLERANCE)
    steps = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert {r["on_policy"] for r in steps if "on_policy" in r} == {0.0, 1.0}  # both kinds of batch were drawn
    assert_same_weights(adapter(multi), adapter(single), tol=TOLERANCE)


# -------------------------------------------------------------------------------------------------- teacher
def test_a_teacher_with_another_vocabulary_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, tokenizer,
                                                                             monkeypatch):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<velmora>"])
    teacher = tmp_path / "other-vocab"
    build_tiny_model(other, seed=2).save_pretrained(teacher)
    other.save_pretrained(teacher)
    from tuneforge.engine import trainer as trainer_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the vocabulary check")

    monkeypatch.setattr(trainer_module, "build_model", no_model)
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    with pytest.raises(ConfigError, match=r"gkd.teacher: .* does not share the student's vocabulary: the teacher's "
                                          r"tokenizer has \d+ tokens and the student's \d+.*'<velmora>'"):
        ready(gkd_values(tiny_model_dir, teacher, rows, tmp_path))


def test_a_teacher_with_padding_rows_in_its_head_is_compared_over_the_tokenizer_ids(tiny_model_dir, tmp_path,
                                                                                     tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = tmp_path / "padded"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tokenizer) + 64})).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    trainer = ready(gkd_values(tiny_model_dir, teacher, rows, tmp_path, gkd={"lmbda": 0.0}))
    assert trainer.recipe.teacher.vocab_size == len(tokenizer)
    batch = trainer.epoch_batches(shuffle=False)[0].responses
    with torch.no_grad():
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        selected = batch.targets != IGNORE_INDEX
        student = trainer.model(**inputs).logits[selected]
        teacher_logits = trainer.recipe.teacher.model(**inputs).logits[selected][:, :len(tokenizer)]
    want = float(direct_divergences(student, teacher_logits, 0.5, 1.0)["jsd"].sum()) / int(selected.sum())
    assert float(trainer.compute_gradients([batch])) == pytest.approx(want, rel=1e-4)


def test_a_lora_run_as_teacher_is_that_run_merged_and_frozen(tiny_model_dir, tmp_path):
    sft = tf.train("sft", model=str(tiny_model_dir), data={"train": QA_ROWS[:8], "max_length": 128},
                   output_dir=tmp_path / "sft", show_progress=False, log=None, lora={"r": 4, "alpha": 8},
                   train={"max_steps": 3, "lr": 1e-2, "batch_size": 4, "mixed_precision": "no"})
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    trainer = ready(gkd_values(tiny_model_dir, Path(sft.path), rows, tmp_path, gkd={"lmbda": 0.0}))
    teacher = trainer.recipe.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    as_loaded, _ = load_for_inference(resolve_model(str(sft.path)))  # the run as tuneforge loads it: PEFT, adapter on
    batch = trainer.epoch_batches(shuffle=False)[0].responses
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        torch.testing.assert_close(teacher(**inputs).logits, as_loaded(**inputs).logits, rtol=1e-4, atol=1e-4)
        # The adapter matters: the teacher is not the base it was trained from.
        assert not torch.allclose(teacher(**inputs).logits, trainer.model(**inputs).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------- config and data
@pytest.mark.parametrize("updates, message", [
    ({"gkd": {"teacher": None}}, "gkd.teacher: method gkd needs a teacher"),
    ({"gkd": {"beta": 1.5}}, r"gkd.beta: 1.5 is out of range; it must be between 0.0 and 1.0"),
    ({"gkd": {"lmbda": -0.1}}, r"gkd.lmbda: -0.1 is out of range"),
    ({"gkd": {"temperature": 0.0}}, r"gkd.temperature: 0.0 is out of range"),
    ({"distributed": {"strategy": "fsdp"}}, "method gkd generates with the unsharded model"),
    ({"data": {"packing": True}}, "data.packing: method gkd"),
])
def test_config_errors_name_the_option(tiny_model_dir, teacher_dir, tmp_path, updates, message):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:4])
    values = gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path)
    for section, changes in updates.items():
        values.setdefault(section, {}).update(changes)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_prompts_without_responses_need_lmbda_one(tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    from tuneforge.engine import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_model", None)  # refused before any model is built
    mixed = write_jsonl(tmp_path / "mixed.jsonl", QA_ROWS[:3] + PROMPTS[:1])
    with pytest.raises(DataError, match=r"mixed.jsonl, row 4, field 'prompt': a prompt without a response, but "
                                        r"gkd.lmbda=0.5 .* set gkd.lmbda: 1"):
        ready(gkd_values(tiny_model_dir, teacher_dir, mixed, tmp_path))


def test_prompts_and_conversations_read_and_a_text_row_is_refused(tiny_model_dir, teacher_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "What is item 1?", "system": "Be brief."},
        {"prompt": "What is item 2?", "completion": "Item 2 is blue."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "What is item 3?"},
                      {"role": "assistant", "content": "Item 3 is green."}]}])
    trainer = ready(gkd_values(tiny_model_dir, teacher_dir, rows, tmp_path, gkd={"lmbda": 1.0}))
    decode = trainer.tokenizer.decode
    prompts = [decode(e.prompt_ids) for e in trainer.data.train]
    assert "Be brief." in prompts[0] and prompts[0].rstrip().endswith("assistant")
    # The prompt of a conversation is everything before its last assistant message.
    assert "Hello." in prompts[2] and "What is item 3?" in prompts[2] and "green" not in prompts[2]
    assert trainer.data.train[0].response is None and trainer.data.train[2].response.num_trained > 0
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Just some text."}])
    with pytest.raises(DataError, match="a plain-text row has no prompt to answer"):
        ready(gkd_values(tiny_model_dir, teacher_dir, text, tmp_path, gkd={"lmbda": 1.0}))


# ------------------------------------------------------------------------------------------- front ends
def test_the_cli_distils_from_prompts_alone_and_validates_on_the_students_answers(tiny_model_dir, teacher_dir,
                                                                                  tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:8])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    values = gkd_values(tiny_model_dir, teacher_dir, prompts, tmp_path, gkd={"lmbda": 1.0, "beta": 0.0},
                        data={"validation": str(held_out)}, train={"max_steps": 4, "lr": 3e-2},
                        eval={"at_start": True})
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(r["on_policy"] == 1.0 and r["response_length"] > 0 for r in steps)
    # beta 0: the loss is the forward KL itself, which the step also logs as a statistic.
    assert all(r["loss"] == pytest.approx(r["forward_kl"], rel=1e-5) for r in steps)
    evaluations = [r for r in records if "val_loss" in r]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 4
    assert all(r["val_forward_kl"] > 0 and r["val_reverse_kl"] > 0 for r in evaluations)
    assert "step 1 sample: " in capsys.readouterr().err  # a sampled answer is shown on logged steps
    assert cli_main(["data", "preview", str(config), "--n", "1"]) == 0
    assert "What is item 0?" in capsys.readouterr().out


def test_the_python_api_trains_gkd(tiny_model_dir, teacher_dir, tmp_path):
    run = tf.train("gkd", model=str(tiny_model_dir), data={"train": QA_ROWS[:8], "max_length": 128},
                   validation=QA_ROWS[8:10], output_dir=tmp_path / "api", show_progress=False, log=None,
                   lora={"r": 4, "alpha": 8}, gkd={"teacher": str(teacher_dir), "max_new_tokens": 6},
                   train={"max_steps": 2, "batch_size": 4, "mixed_precision": "no"})
    assert run.summary["method"] == "gkd" and run.summary["steps"] == 2
    assert run.summary["val_loss"] > 0 and "val_reverse_kl" in run.summary
    assert (Path(run.path) / "adapter" / "adapter_model.safetensors").is_file()


def test_bench_reports_the_throughput_of_distillation(tiny_model_dir):
    result = run_bench(method="gkd", model=str(tiny_model_dir), batch_size=2, max_length=64, steps=2, lora_r=4,
                       max_new_tokens=4, rows=8)
    assert result["method"] == "gkd" and result["steps"] == 2
    assert result["tokens_per_s"] > 0 and result["generated_tokens_per_s"] > 0 and 0 < result["sample_share"] <= 1
    assert result["on_policy"] == 1.0

"""Generation metrics, behaviour checks and reward functions on hand-made inputs with answers worked out by hand
(ROUGE-L from the LCS, SQuAD's F1 from token counts), plus a brute-force parity check of the LCS."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

from tuneforge.errors import UserError
from tuneforge.rewards import functions
from tuneforge.rewards.functions import RewardFunctions, exact_answer, format_regex, load_callable
from tuneforge.eval.metrics import (compile_pattern, contains, exact_match, is_refusal, lcs_length, regex_match,
                                    response_length, rouge_l, score_generations, stopped_by_itself, token_f1)


# ------------------------------------------------------------------------------------------- existing metrics
def test_exact_match_and_contains_keep_their_behaviour():
    assert exact_match("The Denver Broncos!", "denver broncos")
    assert not exact_match("Denver Broncos won", "Denver Broncos")
    assert contains("It was the Denver Broncos.", "Denver Broncos")
    assert not contains("Broncosaurus", "Broncos")  # whole words only
    assert not contains("anything", "")


# ------------------------------------------------------------------------------------------------------- regex
def test_regex_match_searches_the_raw_prediction():
    assert regex_match("The answer is 42.", r"\d+")
    assert not regex_match("The answer is 42.", r"^\d+$")
    assert regex_match("42", r"^\d+$")
    assert not regex_match("ANSWER", "answer") and regex_match("ANSWER", "(?i)answer")
    assert regex_match("x = 3", re.compile(r"x = \d"))  # a compiled pattern is used as is


def test_patterns_are_compiled_once_and_an_invalid_one_is_named():
    assert compile_pattern(r"\d+") is compile_pattern(r"\d+")
    with pytest.raises(UserError, match=re.escape("invalid regular expression '([a-z'")):
        regex_match("abc", "([a-z")


# ------------------------------------------------------------------------------------------------------ SQuAD F1
@pytest.mark.parametrize("prediction, reference, expected", [
    ("the Denver Broncos", "Denver Broncos", 1.0),               # articles and case are normalised away
    ("Denver Broncos", "Broncos", 2 / 3),                        # P = 1/2, R = 1: 2 * 1/2 / (3/2)
    # SQuAD dev, "Where did Super Bowl 50 take place?": 11 reference tokens after normalisation, 3 predicted,
    # all 3 shared: P = 1, R = 3/11, F1 = 2 * 3/11 / (14/11) = 3/7.
    ("Santa Clara, California", "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California", 3 / 7),
    ("go go go", "go stop", 2 / 5),                              # multiset: "go" is shared once; P = 1/3, R = 1/2
    ("Paris", "London", 0.0),
    ("", "", 1.0),                                               # SQuAD v2: no answer on both sides
    ("the", "Paris", 0.0),                                       # only an article: empty after normalisation
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------- ROUGE-L
def brute_force_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of ``a`` that is also a subsequence of ``b``, by trying them all."""
    def is_subsequence(seq, of):
        it = iter(of)
        return all(token in it for token in seq)
    for size in range(len(a), 0, -1):
        if any(is_subsequence(seq, b) for seq in itertools.combinations(a, size)):
            return size
    return 0


def test_lcs_length_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == lcs_length(b, a) == brute_force_lcs(a, b), (a, b)


@pytest.mark.parametrize("prediction, reference, expected", [
    # Lin (2004)'s example: with articles dropped the reference is "police killed gunman". "police kill gunman"
    # shares "police ... gunman" (LCS 2 of 3 and 3): F = 2/3. "gunman kill police" keeps only one word in order.
    ("police kill the gunman", "police killed the gunman", 2 / 3),
    ("the gunman kill police", "police killed the gunman", 1 / 3),
    # LCS "one three five" = 3; P = 3/5, R = 3/4; F = 2 * 0.45 / 1.35 = 2/3.
    ("one two three four five", "one three five seven", 2 / 3),
    ("x y z w", "w z y x", 1 / 4),                     # reversed: LCS 1, unlike F1 (which ignores order)
    ("Same words, same ORDER.", "same words same order", 1.0),
    ("", "", 1.0),
    ("", "something", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_sees_order_where_f1_does_not():
    assert token_f1("x y z w", "w z y x") == 1.0
    assert rouge_l("x y z w", "w z y x") == 0.25


# ---------------------------------------------------------------------------------------------- behaviour checks
def test_stopped_by_itself():
    eos, end_of_turn, pad = 2, 7, 0
    assert stopped_by_itself([5, 6, eos, pad, pad], [eos, end_of_turn])  # stopped, then padded in its batch
    assert stopped_by_itself([5, end_of_turn], [eos, end_of_turn])
    assert not stopped_by_itself([5, 6, 8, 9], [eos, end_of_turn])     # ran to max_new_tokens
    assert not stopped_by_itself([], [eos])
    assert stopped_by_itself(torch.tensor([5, 2, 2]), torch.tensor([2]))  # tensors as generate returns them
    with pytest.raises(UserError, match="no stop token ids"):
        stopped_by_itself([1, 2], [])


def test_response_length_counts_whitespace_words():
    assert response_length("The answer is 42.") == 4
    assert response_length("  spread\n over\tlines ") == 3
    assert response_length("") == 0


REFUSALS = [
    "I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "I'm sorry, but I can't assist with that request.",
    "I’m sorry, but that is not something I can do.",            # curly apostrophe; apology + "but" at the start
    "Sorry, I won't write that.",
    "I cant do that",                                              # apostrophe dropped
    "As an AI, I don't have personal opinions.",
    "I am unable to comply with this request.",
    "Unfortunately, I'm not able to share that information.",
    "I must decline.",
    "Sure! However, I cannot provide medical advice.",            # refusal phrase after an opening
    "Here is some background. That said, I won't help you bypass the lock.",
]
NOT_REFUSALS = [
    "I can't wait to help you with this!",
    "I can't believe how simple this is: 2 + 2 = 4.",
    "I cannot stress this enough: back up your data.",
    "I won't lie, this one is tricky, but the answer is 42.",
    "I can't help but notice the typo in line 3.",
    "I can't help feeling that the second option is better.",
    "I'm sorry to hear that. Here is what you can do.",
    "Paris is the capital of France.",
    "The function cannot return None here.",
    "He said he can't come to the meeting.",
    "Working as an AI engineer requires statistics.",
    "Note that I can't guarantee the exact timing, but bake it for 20 minutes.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_recognised(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_non_refusals_are_not(text):
    assert not is_refusal(text)


def test_documented_false_positive_an_apologetic_correction():
    # An answer that opens with "I'm sorry, but" counts as a refusal: the markers cannot tell the two apart.
    assert is_refusal("I'm sorry, but 2 + 2 is 4, not 5.")


# ----------------------------------------------------------------------------------------------------- aggregate
def test_score_generations_means_worked_by_hand():
    predictions = ["Denver Broncos", "I can't help with that.", "It is 42 I think"]
    references = [["Broncos", "The Denver Broncos"], "Carolina Panthers", "42"]
    scores = score_generations(predictions, references, patterns=r"\d+")
    assert list(scores) == ["exact_match", "contains", "f1", "rouge_l", "regex", "refusal_rate", "mean_length"]
    # Row 1 takes its best reference ("The Denver Broncos": all 1.0). Row 2 shares nothing. Row 3: "42" is one
    # of the 5 predicted tokens: F1 = 2 * (1/5) / (6/5) = 1/3, and the LCS is the same token, so ROUGE-L = 1/3.
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["contains"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert scores["regex"] == pytest.approx(1 / 3)
    assert scores["refusal_rate"] == pytest.approx(1 / 3)
    assert scores["mean_length"] == pytest.approx((2 + 5 + 5) / 3)


def test_score_generations_choices_and_errors():
    assert score_generations(["a b", "c"]) == {"refusal_rate": 0.0, "mean_length": 1.5}
    assert score_generations(["42", "x"], patterns=[r"^\d+$", "x"], metrics=["regex"]) == {"regex": 1.0}
    with pytest.raises(UserError, match="unknown metric 'bleu'.*exact_match"):
        score_generations(["a"], ["a"], metrics=["bleu"])
    with pytest.raises(UserError, match="f1 needs references"):
        score_generations(["a"], metrics=["f1"])
    with pytest.raises(UserError, match="regex needs patterns"):
        score_generations(["a"], metrics=["regex"])
    with pytest.raises(UserError, match="1 references for 2 predictions"):
        score_generations(["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        score_generations([])


# -------------------------------------------------------------------------------------------- loading callables
USER_FILE = '''
def length_bonus(prompt, response, row):
    return len(response) / 10

class Scorers:
    @staticmethod
    def always_one(prompt, response, row):
        return 1.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_load_callable_from_a_module():
    assert load_callable("tuneforge.rewards.functions:exact_answer") is exact_answer
    assert load_callable("tuneforge.rewards.functions:format_regex") is format_regex
    assert load_callable("os.path:join")("a", "b").endswith("b")


def test_load_callable_from_a_file(user_file, monkeypatch):
    fn = load_callable(f"{user_file}:length_bonus")
    assert fn("p", "0123456789", {}) == 1.0
    assert load_callable(f"{user_file}:length_bonus") is fn  # the file is imported once
    assert load_callable(f"{user_file}:Scorers.always_one")("p", "r", {}) == 1.0
    monkeypatch.chdir(user_file.parent)  # relative to the working directory
    assert load_callable("my_rewards.py:length_bonus")("p", "01234", {}) == 0.5


@pytest.mark.parametrize("spec, message", [
    ("just_a_name", "must look like 'package.module:function' or 'path/to/file.py:function'"),
    ("tuneforge.rewards.functions:", "must look like"),
    ("tuneforge.rewards.functions:not-a-name", "must look like"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    ("tuneforge.no_such_module:f", "module 'tuneforge.no_such_module' not found"),
    ("tuneforge.rewards.functions:missing", "has no attribute 'missing'; it defines .*exact_answer.*format_regex"),
    ("tuneforge.rewards.functions:RewardFunctions.missing", "has no attribute 'RewardFunctions.missing'"),
    ("tuneforge.rewards.functions:_SPEC_FORM", "is a str, not a function"),
    ("does/not/exist.py:f", r"file does/not/exist.py not found \(relative paths are from "),
])
def test_load_callable_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load_callable(spec)


def test_load_callable_errors_in_user_files(user_file, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="has no attribute 'nope'; it defines Scorers, length_bonus"):
        load_callable(f"{user_file}:nope")
    with pytest.raises(UserError, match="NOT_A_FUNCTION in .* is a int, not a function"):
        load_callable(f"{user_file}:NOT_A_FUNCTION")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UserError, match="importing .*broken.py failed"):
        load_callable(f"{broken}:f")
    # A module that is found but imports something missing: the message names the missing dependency.
    (tmp_path / "needs_dependency.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="importing needs_dependency failed: No module named 'no_such_dependency_xyz'"):
        load_callable("needs_dependency:f")


# ------------------------------------------------------------------------------------------- combining rewards
def test_weighted_combination():
    rewards = RewardFunctions({"correct": lambda p, r, row: float(r == row["answer"]),
                               "short": lambda p, r, row: len(r.split()) / 10},
                              weights=[2.0, -0.5])
    score = rewards("q", "4", {"answer": "4"})
    assert score.scores == {"correct": 1.0, "short": 0.1}
    assert score.total == pytest.approx(2.0 * 1.0 - 0.5 * 0.1)
    batch = rewards.score_batch(["q", "q"], ["4", "five words in this answer"], [{"answer": "4"}] * 2)
    assert [s.total for s in batch] == pytest.approx([1.95, -0.25])
    assert RewardFunctions({"one": lambda p, r, row: 1.0}).weights == {"one": 1.0}  # weights default to 1


def test_rewards_loaded_from_specs(user_file):
    rewards = RewardFunctions.load(["tuneforge.rewards.functions:exact_answer", f"{user_file}:length_bonus"],
                                   weights=[1.0, 0.5])
    score = rewards("What is 6 * 7?", "It is 42", {"answer": "42"})
    assert score.scores == {"tuneforge.rewards.functions:exact_answer": 1.0, f"{user_file}:length_bonus": 0.8}
    assert score.total == pytest.approx(1.4)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "returned nan; rewards must be finite"),
    (float("inf"), "returned inf; rewards must be finite"),
    ("1.0", "returned '1.0'; it must return a float"),
    (None, "returned None; it must return a float"),
    ([1.0], "returned a list; it must return a float"),
])
def test_invalid_reward_values_name_the_function(value, message):
    rewards = RewardFunctions({"bad": lambda p, r, row: value})
    with pytest.raises(UserError, match=re.escape("reward function 'bad' for the response 'an answer' ") + message):
        rewards("q", "an answer", {})


def test_reward_values_that_convert_to_float_are_accepted():
    rewards = RewardFunctions({"bool": lambda p, r, row: True, "tensor": lambda p, r, row: torch.tensor(0.5),
                               "int": lambda p, r, row: 2})
    assert rewards("q", "r", {}).scores == {"bool": 1.0, "tensor": 0.5, "int": 2.0}


def test_reward_configuration_errors():
    one = {"one": lambda p, r, row: 1.0}
    with pytest.raises(UserError, match="2 reward weights for 1 reward functions"):
        RewardFunctions(one, weights=[1.0, 2.0])
    with pytest.raises(UserError, match="reward weight for 'one' is nan"):
        RewardFunctions(one, weights=[math.nan])
    with pytest.raises(UserError, match="no reward functions"):
        RewardFunctions({})
    with pytest.raises(UserError, match="listed twice"):
        RewardFunctions.load(["tuneforge.rewards.functions:exact_answer"] * 2)


# ---------------------------------------------------------------------------------------- example reward functions
GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("response, answer, expected", [
    ("She sold 72 clips in total.", GSM8K_ANSWER, 1.0),          # the reference is cut after "####"
    ("48 + 24 = 72 clips, then 3 more", GSM8K_ANSWER, 0.0),      # the *last* number counts
    ("So the total is 1,234.", "1234", 1.0),                     # separators and the full stop are ignored
    ("x = 72.0", "72", 1.0),                                     # compared as numbers
    ("between 3-4 hours", "4", 1.0),                             # "-4" after a word is not negative
    ("The result is -4", "-4", 1.0),
    ("no number here", "5", 0.0),
    ("The answer is: Paris.", "Paris", 1.0),                     # text after the answer marker, normalised
    ("paris", "Paris", 1.0),
    ("I think it's Lyon", "Paris", 0.0),
])
def test_exact_answer(response, answer, expected):
    assert exact_answer("prompt", response, {"answer": answer}) == expected


def test_format_regex():
    assert format_regex("p", "42", {"pattern": r"^\d+$"}) == 1.0
    assert format_regex("p", "about 42", {"pattern": r"^\d+$"}) == 0.0
    assert format_regex("p", "<think>a\nb</think> 4", {"pattern": r"(?s)^<think>.*</think>"}) == 1.0


def test_example_functions_name_a_missing_field():
    with pytest.raises(UserError, match="exact_answer reads the row's 'answer' field; this row has 'question'"):
        exact_answer("p", "r", {"question": "q"})
    with pytest.raises(UserError, match="format_regex reads the row's 'pattern' field"):
        format_regex("p", "r", {})
    with pytest.raises(UserError, match="invalid regular expression"):
        format_regex("p", "r", {"pattern": "("})


def test_module_docstring_documents_the_interface():
    assert "def reward(prompt: str, response: str, row: dict) -> float" in functions.__doc__

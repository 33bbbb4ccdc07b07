"""Rule rewards and their weighted sum."""

import pytest

from rlctl.errors import RlctlError
from rlctl.rewards import WeightedRewards
from rlctl.rewards.rules import Term, exact_number, format_match, gsm8k, math_verify


@pytest.mark.parametrize(
    "completion, answer, expected",
    [("7", "7", 1.0), ("The answer is 7.", "7", 1.0), ("7.0", "7", 1.0), ("1,234 apples", "1234", 1.0),
     ("-3", "-3", 1.0), ("3 + 4 = 7", "7", 0.0), ("seven", "7", 0.0), ("", "7", 0.0), ("70", "7", 0.0)],
)  # fmt: skip
def test_exact_number_compares_the_first_number(completion, answer, expected):
    assert exact_number(completion, answer) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", 1.0),
        ("so 12 - 5 = 7", 1.0),
        ("#### 8", 0.0),
        ("#### 7.", 1.0),
        ("no numbers", 0.0),
    ],
)
def test_gsm8k_reads_the_answer_after_the_marker_else_the_last_number(completion, expected):
    assert gsm8k(completion, "7") == expected


def test_math_verify_accepts_equivalent_forms():
    assert math_verify("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math_verify("The answer is $\\frac{1}{3}$", "0.5") == 0.0


def test_format_reward_needs_a_pattern():
    assert format_match("#### 5", "", pattern=r"####\s*\d") == 1.0
    assert format_match("5", "", pattern=r"####") == 0.0
    with pytest.raises(RlctlError, match="needs a pattern"):
        format_match("x", "")


def test_weighted_sum_and_accuracy_from_the_designated_term():
    rewards = WeightedRewards([Term("exact_number", 1.0, {}), Term("format", 0.5, {"pattern": r"^\d+$"})])
    result = rewards(["7", "The answer is 7", "8"], ["7", "7", "7"])
    # "7": 1 + 0.5 ; "The answer is 7": 1 + 0 ; "8": 0 + 0.5.
    assert result.scores.tolist() == [1.5, 1.0, 0.5]
    assert result.correct.tolist() == [True, True, False]
    assert result.per_term["format"].tolist() == [1.0, 0.0, 1.0]


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(
        RlctlError,
        match=r"unknown reward 'exact'; known: \['exact_number', 'format', 'gsm8k', 'http', 'judge', 'math_verify', 'reward_model'\]",
    ):
        WeightedRewards([Term("exact", 1.0, {})])

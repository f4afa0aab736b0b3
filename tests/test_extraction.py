"""Answer extraction on output shapes that real models emit, and gold/number parsing."""

import pytest

from training.gsm8k import extract_answer, normalize_number, parse_gold

# (model output, expected answer, extractor that must match)
OUTPUT_SHAPES = [
    ("<think>\nm=48/2=24→t=48+24=72\n</think>\n#### 72", "72", "hash"),
    ("#### 72", "72", "hash"),
    ("####72", "72", "hash"),
    ("#### $1,234", "1234", "hash"),
    ("#### -5", "-5", "hash"),
    ("#### 3.50", "3.5", "hash"),
    ("#### 0.25", "0.25", "hash"),
    ("#### 10.", "10", "hash"),
    ("Step 1: 3+4=7\n#### 7\n#### 8", "8", "hash"),
    ("<think>\n12+7=19; 19-5=14\n</think>\n#### 14<|im_end|>", "14", "hash"),
    ("<think>\nthe answer is 99 maybe\n</think>\n#### 14", "14", "hash"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72", "hash"),
    ("The answer is 42.", "42", "answer_is"),
    ("the answer is $18.", "18", "answer_is"),
    ("So the final answer is 1,000", "1000", "answer_is"),
    ("Final answer: 7", "7", "answer_is"),
    ("**Answer:** 36", "36", "answer_is"),
    ("Answer: -3", "-3", "answer_is"),
    ("The answer is: 12.5", "12.5", "answer_is"),
    ("Therefore, the answer is 5 apples.", "5", "answer_is"),
    ("She has 3 left, so the answer is 3", "3", "answer_is"),
    ("The answer is $0.75.", "0.75", "answer_is"),
    ("Answer = 64", "64", "answer_is"),
    ("The final answer is 2,500 dollars.", "2500", "answer_is"),
    ("\\boxed{18}", "18", "boxed"),
    ("So she makes $\\boxed{18}$ dollars.", "18", "boxed"),
    ("Total: 3 + 4 = 7, so \\boxed{7}.", "7", "boxed"),
    ("\\boxed{1,200}", "1200", "boxed"),
    ("\\boxed{ 42 }", "42", "boxed"),
    ("\\boxed{-2}", "-2", "boxed"),
    ("\\boxed{\\$15}", "15", "boxed"),
    ("\\boxed{12.50}", "12.5", "boxed"),
    ("She pays 5 * 3 = 15 dollars.", "15", "last_number"),
    ("48 + 24 = 72", "72", "last_number"),
    ("It takes 2 hours and 30 minutes", "30", "last_number"),
    ("Total = $1,050.00", "1050", "last_number"),
    ("<think>\n2+2=4\n</think>\n4", "4", "last_number"),
    ("<think>\n2+2=4\n</think>\nFour apples, i.e. 4.", "4", "last_number"),
    ("<think>\nunfinished 3+3", "3", "last_number"),
    ("He has -7 degrees", "-7", "last_number"),
    ("costs .5 dollars", "0.5", "last_number"),
    ("It is 25%.", "25", "last_number"),
    # Shapes that fooled earlier extractors: each row is a reported misread.
    ("#### −10", "-10", "hash"),  # U+2212, the minus sign
    ("The answer is −3.", "-3", "answer_is"),
    ("#### **18** per day, from 9 eggs", "18", "hash"),
    ("She needs to answer 34-16 = 18 questions.\nA: 18", "18", "last_number"),  # "answer" the verb
    ("The answer is 12 + 6 = 18.", "18", "answer_is"),
    ("Answer: 3 x 4 = 12 cookies", "12", "answer_is"),
    ("\\boxed{1{,}234}", "1234", "boxed"),
    ("\\boxed{1\\,234}", "1234", "boxed"),
    ("\\boxed{\\dfrac{36}{2}}", "18", "boxed"),
    ("\\boxed{\\frac{1}{4}}", "0.25", "boxed"),
    ("\\boxed{18 \\text{ eggs}}", "18", "boxed"),
    ("\\boxed{\\$1,\\!250}", "1250", "boxed"),
    ("**Final Answer:**\n**72** clips", "72", "answer_is"),  # the number on the heading's next line
    ("### Final Answer:\n\n$72", "72", "answer_is"),
    ("**Final Answer**: 72", "72", "answer_is"),
    ("no digits at all", None, None),
    ("", None, None),
    ("<think>\n</think>\n", None, None),
]


@pytest.mark.parametrize(("output", "expected", "extractor"), OUTPUT_SHAPES)
def test_extract_answer(output, expected, extractor):
    assert extract_answer(output) == (expected, extractor)


def test_table_is_large_enough():
    assert len(OUTPUT_SHAPES) >= 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", "72"),
        ("$1,234", "1234"),
        ("-3.0", "-3"),
        ("3.50", "3.5"),
        ("7.", "7"),
        ("−4", "-4"),
        ("abc", None),
        ("", None),
        ("1e400", "1" + "0" * 400),
        (".25", "0.25"),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("a\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### -12", "-12"),
        ("#### $5.50", "5.5"),
        ("#### 0.3 ", "0.3"),
    ],
)
def test_parse_gold(answer, gold):
    assert parse_gold(answer) == gold


def test_parse_gold_rejects_rows_without_a_final_line():
    from eval_artifacts.study.errors import DataError

    with pytest.raises(DataError, match="#### N"):
        parse_gold("She has 5 apples.")

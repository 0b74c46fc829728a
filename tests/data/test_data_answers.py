import pytest

from fedsoda_cli.data.answers import extract_gsm8k_answer, normalize_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### $1,234,567.00", "1234567"),
        ("#### -5", "-5"),
        ("#### \u22125", "-5"),  # unicode minus
        ("#### 3.0", "3"),
        ("#### 0.50", "0.5"),
        ("#### .5", "0.5"),
        ("#### 18.", "18"),
        ("#### -0", "0"),
        ("The total is 12 apples, so 40 cents. 7.", "7"),  # no ####: last number
        ("no number here", None),
        ("", None),
        ("#### 18\n\nQuestion: Tom has 3 apples ...\nAnswer: ... #### 3", "18"),  # first answer wins
        ("#### \nso the answer is 42", "42"),  # #### without a number: last number
        ("#### twelve", None),
        ("numbers 3,4 and 5", "5"),
        ("list 3,4", "4"),  # not 34
        ("#### 1,000 dollars and 20 cents", "1000"),
    ],
)
def test_extract(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gold_from_real_solution_matches_prediction():
    gold = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert extract_gsm8k_answer(gold) == extract_gsm8k_answer("The answer is $18.00.")


def test_normalize_rejects_garbage():
    assert normalize_number("abc") is None
    assert normalize_number("1,200.50") == "1200.5"


def test_every_real_gsm8k_test_answer_extracts(data_dir):
    from fedsoda_cli.data.tasks import read_jsonl

    for rec in read_jsonl(data_dir / "gsm8k" / "test.jsonl"):
        gold = rec.fields["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_gsm8k_answer(rec.fields["answer"]) == gold, rec.where

"""GSM8K answer extraction: the final number of a solution text, normalised for exact match."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: thousands-grouped ("1,234,567.5") or plain ("-12", "3.75", ".5"). Grouping needs exactly
# three digits per group, so a list like "3,4" reads as two numbers, not 34.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # unicode minus / en dash as a sign


def extract_gsm8k_answer(text: str) -> str | None:
    """The answer number in `text`, normalised; None when the text has no number.

    Rule: the first number on the line after the first `####` that is followed by one; models often
    keep generating further "Question/Answer" pairs after their answer, so later `####`s are noise.
    Without such a `####`, the last number in the text. Normalisation: "$", "," and a trailing "."
    go; "3.0" == "3"; "0.50" == "0.5"; "-0" == "0". So `extract(pred) == extract(gold)` is exact match.
    """
    text = text.translate(_MINUS).replace("$", "")
    for tail in text.split("####")[1:]:
        found = _NUMBER.search(tail.strip().split("\n", 1)[0])
        if found:
            return normalize_number(found.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_number(raw: str) -> str | None:
    """ "1,200.50" -> "1200.5", "3.0" -> "3", "-0" -> "0"; None when `raw` is not a number."""
    try:
        value = Decimal(raw.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")

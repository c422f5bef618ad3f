"""Key facts of a text (numbers, prices, times, dates, phone numbers, names, email and web addresses) and whether an
answer states a reference's facts: shared by augmentation's equivalence filter and the `fact_accuracy` metric.

It lives in the `metrics` package because the metric script imports it (metrics import only `metrics` and
`data_checks`); `tasks.common.facts` is where the rest of fewtune imports it from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from data_checks.text import EMAIL, ISO_DATE, PHONE, PHONE_DIGITS

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_WEEKDAYS = frozenset("monday tuesday wednesday thursday friday saturday sunday".split())
_MONTHS = frozenset(
    "january february march april may june july august september october november december".split()
)
_CALENDAR = _WEEKDAYS | _MONTHS
_VERB_MONTHS = frozenset({"may", "march"})  # a month only when capitalised ("you may", "we march")
_TIME_12H = re.compile(r"(?<![\d:.])(\d{1,2})(?:[:.]([0-5]\d))?\s*([ap])\.?\s?m\b\.?", re.IGNORECASE)
_TIME_24H = re.compile(r"(?<![\d:.])([01]?\d|2[0-3]):([0-5]\d)(?![\d:])")
_TIME_WORDS = {"noon": "12:00", "midday": "12:00", "midnight": "00:00"}
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:st|nd|rd|th)?(?![\w])|(?<![\w.])\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


def _normal_number(text: str) -> str | None:
    digits = re.sub(r"(st|nd|rd|th)$", "", text)
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", digits):
        digits = digits.replace(",", "")
    elif re.fullmatch(r"\d{1,3}(\.\d{3}){2,}(,\d+)?|\d{1,3}(\.\d{3})+,\d+", digits):  # 1.234.567 or 1.234,50
        digits = digits.replace(".", "")
    digits = digits.replace(",", ".")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value == value.to_integral() else str(value.normalize())


def _times(text: str) -> tuple[dict[str, str], str]:
    """Times as HH:MM (11 am, 11:00 and 11.00am agree) and the text with them blanked out."""
    found: dict[str, str] = {}

    def twelve(m: re.Match) -> str:
        hour = int(m.group(1)) % 12 + (12 if m.group(3).lower() == "p" else 0)
        found.setdefault(f"{hour:02d}:{m.group(2) or '00'}", m.group(0).strip().rstrip("."))
        return " "

    def day(m: re.Match) -> str:
        found.setdefault(f"{int(m.group(1)):02d}:{m.group(2)}", m.group(0))
        return " "

    text = _TIME_24H.sub(day, _TIME_12H.sub(twelve, text))
    for word, value in _TIME_WORDS.items():
        if re.search(rf"\b{word}\b", text, re.IGNORECASE):
            found.setdefault(value, word)
    return found, text


def _number_words(text: str, skip_one: bool) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in re.finditer(r"\b([a-z]+)(?:[- ]([a-z]+))?\b", text.casefold()):
        first, second = m.group(1), m.group(2)
        if first in _TENS:
            value = _TENS[first] + (_NUMBER_WORDS.get(second, 0) if second and 0 < _NUMBER_WORDS.get(second, 0) < 10 else 0)
            found.setdefault(str(value), m.group(0))
        elif first in _NUMBER_WORDS and not (skip_one and first == "one"):
            found.setdefault(str(_NUMBER_WORDS[first]), first)
        elif second in _NUMBER_WORDS and not (skip_one and second == "one"):
            found.setdefault(str(_NUMBER_WORDS[second]), second)
    return found


def _name_key(word: str) -> str:
    key = re.sub(r"['’]s$", "", word.casefold())
    return key[:-1] if key.endswith("s") and key[:-1] in _CALENDAR else key


def _names(text: str) -> dict[str, str]:
    """Capitalised words that do not start a sentence (there capitals say nothing), and calendar words anywhere."""
    found: dict[str, str] = {}
    for m in _WORD.finditer(text):
        word = m.group(0)
        key = _name_key(word)
        if key in _CALENDAR and not (key in _VERB_MONTHS and word[0].islower()):
            found.setdefault(key, word)
        elif word[0].isupper() and key not in ("i", "i'm", "i'll", "i've", "i'd"):
            if m.start() > 0 and not _SENTENCE_END.search(text[: m.start()]):
                found.setdefault(key, word)
    return found


_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()]+[^\s<>().,;:!?]", re.IGNORECASE)


def _contacts(text: str) -> dict[str, str]:
    """Email addresses and web addresses, written exactly."""
    return {m.group(0).casefold(): m.group(0) for pattern in (EMAIL, _URL) for m in pattern.finditer(text)}


_BARE_PHONE = re.compile(r"(?<![\w+.,])(?:\+|0)\d{7,14}(?![\w]|[.,]\d)")
_THOUSANDS = re.compile(r"\d{1,3}(?:([.,])\d{3})(?:\1\d{3})*")  # 12.000.000: a number, not a phone


def _phones(text: str) -> tuple[dict[str, str], str]:
    """Phone numbers (8 to 15 digits in groups, or a run of digits after + or 0) and the text with them blanked out.

    Each is keyed by its digits ("+" first when written with a country code): `same_phone` compares them.
    """
    found: dict[str, str] = {}

    def blank(m: re.Match) -> str:
        written = m.group(0)
        digits = re.sub(r"\D", "", written)
        if (
            not PHONE_DIGITS[0] <= len(digits) <= PHONE_DIGITS[1]
            or ISO_DATE.fullmatch(written)
            or _THOUSANDS.fullmatch(written)
        ):
            return written
        found.setdefault(("+" if written.startswith("+") else "") + digits, written)
        return " "

    return found, _BARE_PHONE.sub(blank, PHONE.sub(blank, text))


def same_phone(a: str, b: str) -> bool:
    """Whether two phone keys are one number: equal digits, or one is the other written with a country code
    (+44 41 555 2873 and 041 555 2873) — the longer ends with the shorter's digits after its trunk zeros."""
    if a.startswith("+") and b.startswith("+"):
        return a == b
    x, y = a.lstrip("+").lstrip("0"), b.lstrip("+").lstrip("0")
    short, long = sorted((x, y), key=len)
    return len(short) >= PHONE_DIGITS[0] - 1 and long.endswith(short)


@dataclass(frozen=True)
class Facts:
    """Key facts of a text, each normalised value with the words it was written as."""

    figures: dict[str, str]  # numbers and times ("t:HH:MM")
    names: dict[str, str]
    contacts: dict[str, str] = field(default_factory=dict)  # email and web addresses
    phones: dict[str, str] = field(default_factory=dict)  # phone numbers by their digits

    def __bool__(self) -> bool:
        return bool(self.figures or self.names or self.contacts or self.phones)

    def __len__(self) -> int:
        return len(self.figures) + len(self.names) + len(self.contacts) + len(self.phones)

    def by_kind(self) -> dict[str, dict[str, str]]:
        """The facts by kind: time, number (counts, prices, dates' days and years), phone, email, url, weekday,
        month and name (other capitalised words). Facts of one kind can contradict each other ("another time")."""
        kinds: dict[str, dict[str, str]] = {}
        for key, written in self.figures.items():
            kinds.setdefault("time" if key.startswith("t:") else "number", {})[key] = written
        for key, written in self.phones.items():
            kinds.setdefault("phone", {})[key] = written
        for key, written in self.contacts.items():
            kinds.setdefault("email" if "@" in key else "url", {})[key] = written
        for key, written in self.names.items():
            kind = "weekday" if key in _WEEKDAYS else "month" if key in _MONTHS else "name"
            kinds.setdefault(kind, {})[key] = written
        return kinds


def key_facts(text: str, number_words: bool = True, skip_one: bool = True) -> Facts:
    """Numbers (prices, dates, counts, as digits or number words), times, phone numbers, addresses and names of a text.

    `skip_one`: "one" is too often not a number ("one of our ...") to count as a fact of the gold text.
    """
    contacts = _contacts(text)
    for written in contacts.values():  # the digits and words of an address are not facts of their own
        text = text.replace(written, " ")
    phones, text = _phones(text)  # nor are a phone number's digit groups
    times, rest = _times(text)
    figures = {f"t:{k}": v for k, v in times.items()}
    for m in _NUMBER.finditer(rest):
        value = _normal_number(m.group(0))
        if value is not None:
            figures.setdefault(value, m.group(0))
    if number_words:
        for value, word in _number_words(rest, skip_one).items():
            figures.setdefault(value, word)
    return Facts(figures, _names(text), contacts, phones)


def _has_phone(phones: dict[str, str], key: str) -> bool:
    return any(same_phone(key, other) for other in phones)


def missing_facts(gold: str, candidate: str) -> list[str]:
    """Key facts of `gold` that `candidate` lacks (as written in `gold`)."""
    want, have = key_facts(gold), key_facts(candidate, skip_one=False)
    words = {_name_key(part) for w in _WORD.finditer(candidate) for part in (w.group(0), *w.group(0).split("-"))}
    lost = [written for value, written in want.figures.items() if value not in have.figures]
    lost += [written for key, written in want.phones.items() if not _has_phone(have.phones, key)]
    lost += [written for key, written in want.names.items() if key not in words]
    lost += [written for key, written in want.contacts.items() if key not in candidate.casefold()]
    return lost


def added_figures(candidate: str, *sources: str) -> list[str]:
    """Numbers, times and phone numbers written in digits in `candidate` that none of `sources` holds (invented)."""
    known: set[str] = set()
    phones: dict[str, str] = {}
    for text in sources:
        facts = key_facts(text, skip_one=False)
        known |= set(facts.figures)
        phones |= facts.phones
    found = key_facts(candidate, number_words=False)
    added = [written for value, written in found.figures.items() if value not in known]
    return added + [written for key, written in found.phones.items() if not _has_phone(phones, key)]


def contradicting_facts(answer: str, reference: str) -> list[str]:
    """Facts of `answer` (as written there) of a kind `reference` states that `reference` does not hold: another
    time where the reference gives times, another number, phone number, email or web address, weekday or month.

    Other names are not compared this way (an answer may name the shop or a product the reference leaves out).
    """
    stated = set(key_facts(reference).by_kind()) - {"name"}  # "one" alone does not make numbers a stated kind ...
    want = key_facts(reference, skip_one=False)  # ... but "one" in the reference is held
    wanted = want.by_kind()
    out: list[str] = []
    for kind, facts in key_facts(answer).by_kind().items():
        if kind not in stated:
            continue
        for key, written in facts.items():
            held = _has_phone(want.phones, key) if kind == "phone" else key in wanted[kind]
            if not held:
                out.append(written)
    return out


def fact_check(answer: str, reference: str) -> dict[str, Any]:
    """Whether `answer` states the key facts of `reference`, with the detail for a report.

    Returns `{"applicable", "correct", "facts", "missing", "contradicting"}`: `applicable` is False when the
    reference carries no key fact (then `correct` is None); otherwise the answer is `correct` when it holds every
    fact of the reference (`missing` is empty) and states no fact of the same kind the reference does not hold
    (`contradicting` is empty). Facts are listed as written (missing: in the reference; contradicting: in the answer).
    """
    facts = key_facts(reference)
    if not facts:
        return {"applicable": False, "correct": None, "facts": [], "missing": [], "contradicting": []}
    written = [w for kind in facts.by_kind().values() for w in kind.values()]
    missing = missing_facts(reference, answer)
    contradicting = contradicting_facts(answer, reference)
    return {
        "applicable": True,
        "correct": not missing and not contradicting,
        "facts": written,
        "missing": missing,
        "contradicting": contradicting,
    }

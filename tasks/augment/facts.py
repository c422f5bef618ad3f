"""Key facts of a text: numbers, prices, times, dates, names, email and web addresses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from data_checks.text import EMAIL

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_CALENDAR = set(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july august "
    "september october november december".split()
)
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
        if key in _CALENDAR:
            found.setdefault(key, word)
        elif word[0].isupper() and key not in ("i", "i'm", "i'll", "i've", "i'd"):
            if m.start() > 0 and not _SENTENCE_END.search(text[: m.start()]):
                found.setdefault(key, word)
    return found


_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()]+[^\s<>().,;:!?]", re.IGNORECASE)


def _contacts(text: str) -> dict[str, str]:
    """Email addresses and web addresses, written exactly."""
    return {m.group(0).casefold(): m.group(0) for pattern in (EMAIL, _URL) for m in pattern.finditer(text)}


@dataclass(frozen=True)
class Facts:
    """Key facts of a text, each normalised value with the words it was written as."""

    figures: dict[str, str]  # numbers and times ("t:HH:MM")
    names: dict[str, str]
    contacts: dict[str, str] = field(default_factory=dict)  # email and web addresses

    def __bool__(self) -> bool:
        return bool(self.figures or self.names or self.contacts)

    def __len__(self) -> int:
        return len(self.figures) + len(self.names) + len(self.contacts)


def key_facts(text: str, number_words: bool = True, skip_one: bool = True) -> Facts:
    """Numbers (prices, dates, counts, as digits or number words), times and names of a text.

    `skip_one`: "one" is too often not a number ("one of our ...") to count as a fact of the gold text.
    """
    contacts = _contacts(text)
    for written in contacts.values():  # the digits and words of an address are not facts of their own
        text = text.replace(written, " ")
    times, rest = _times(text)
    figures = {f"t:{k}": v for k, v in times.items()}
    for m in _NUMBER.finditer(rest):
        value = _normal_number(m.group(0))
        if value is not None:
            figures.setdefault(value, m.group(0))
    if number_words:
        for value, word in _number_words(rest, skip_one).items():
            figures.setdefault(value, word)
    return Facts(figures, _names(text), contacts)


def missing_facts(gold: str, candidate: str) -> list[str]:
    """Key facts of `gold` that `candidate` lacks (as written in `gold`)."""
    want, have = key_facts(gold), key_facts(candidate, skip_one=False)
    words = {_name_key(w.group(0)) for w in _WORD.finditer(candidate)}
    lost = [written for value, written in want.figures.items() if value not in have.figures]
    lost += [written for key, written in want.names.items() if key not in words]
    lost += [written for key, written in want.contacts.items() if key not in candidate.casefold()]
    return lost


def added_figures(candidate: str, *sources: str) -> list[str]:
    """Numbers and times written in digits in `candidate` that none of `sources` holds (invented figures)."""
    known: set[str] = set()
    for text in sources:
        known |= set(key_facts(text, skip_one=False).figures)
    found = key_facts(candidate, number_words=False).figures
    return [written for value, written in found.items() if value not in known]

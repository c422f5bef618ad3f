"""Text inspection used by the data checks: invisible/control characters, mojibake and personal data (PII).

Each finder returns a short human description of the first problem in a text, or None. They are written for speed
on clean data: a cheap test (a character class, an `@`, enough digits) rules most texts out before the exact test.
"""

from __future__ import annotations

import re

import ftfy
from ftfy.badness import is_bad

# C0 controls other than tab/newline/carriage return, DEL, C1 controls, zero-width space, byte-order mark inside
# text, and the bidirectional overrides/isolates that can make text display differently from what a model reads.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u202a-\u202e\u2066-\u2069\ufeff]")
NON_ASCII = re.compile("[^\x00-\x7f]")
REPLACEMENT_CHAR = "\ufffd"

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# Digits in groups with optional +country code, (area code) and space/dot/dash separators.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,5}(?![\w])")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE_DIGITS = (8, 15)  # E.164 numbers have at most 15 digits; fewer than 8 is a price, a code or a time


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def control_character(text: str) -> str | None:
    """The first control or invisible formatting character, e.g. `U+0000 at character 12`."""
    found = CONTROL_CHARS.search(text)
    if found is None:
        return None
    return f"U+{ord(found.group()):04X} at character {found.start()}"


def mojibake(text: str) -> str | None:
    """Text that was decoded with the wrong encoding (e.g. `cafÃ©` for `café`) or lost bytes (U+FFFD)."""
    if not NON_ASCII.search(text):
        return None
    if REPLACEMENT_CHAR in text:
        at = text.index(REPLACEMENT_CHAR)
        return f"replacement character U+FFFD at character {at}: bytes were lost when the text was decoded"
    if not is_bad(text):
        return None
    fixed = ftfy.fix_text(text)
    where = next((i for i, (a, b) in enumerate(zip(text, fixed)) if a != b), 0)
    start = max(0, where - 10)
    return f"mis-decoded text {_shorten(text[start:])!r}, probably {_shorten(fixed[start:])!r}"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digit_count(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def email_address(text: str) -> str | None:
    if "@" not in text:
        return None
    found = EMAIL.search(text)
    return f"email address {found.group()!r}" if found else None


def phone_number(text: str) -> str | None:
    if _digit_count(text) < PHONE_DIGITS[0]:
        return None
    for found in PHONE.finditer(text):
        value = found.group()
        digits = _digit_count(value)
        if PHONE_DIGITS[0] <= digits <= PHONE_DIGITS[1] and not ISO_DATE.fullmatch(value):
            return f"phone number {value!r}"
    return None


def card_number(text: str) -> str | None:
    if _digit_count(text) < 13:
        return None
    for found in CARD.finditer(text):
        digits = re.sub(r"\D", "", found.group())
        if luhn_valid(digits):
            return f"card-like number ending {digits[-4:]} (passes the Luhn check)"
    return None


PII_FINDERS = {"email": email_address, "phone": phone_number, "card": card_number}

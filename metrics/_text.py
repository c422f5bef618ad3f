"""Text normalization shared by the text metrics: SQuAD's, used by `exact_match` and `token_f1`."""

from __future__ import annotations

import re
import string
import unicodedata

SQUAD_CITATION = """
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP",
    year = "2016",
}
"""

_ARTICLES = re.compile(r"\b(?:a|an|the)\b", flags=re.IGNORECASE)


def is_punctuation(char: str) -> bool:
    """ASCII punctuation or any Unicode punctuation character (« », ¿, —, ...)."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize(
    text: str, ignore_case: bool = True, ignore_punctuation: bool = True, ignore_articles: bool = True
) -> str:
    """SQuAD-style normalization: lower-case, drop punctuation, drop articles, collapse whitespace."""
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = "".join(c for c in text if not is_punctuation(c))
    if ignore_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())

"""Near-duplicate search: MinHash LSH over character n-grams, verified with the exact Jaccard similarity.

Two rows are near-duplicates when their prompts (user turns) AND their answers (assistant turns) both have a Jaccard
similarity of at least `threshold` over the character n-grams ("shingles") of the normalised text: case-folded,
punctuation dropped, whitespace collapsed; and when they contain the same numbers in the same order. Requiring both
sides keeps apart what a fine-tuning set should contain: the same answer to differently phrased questions
(paraphrases), and different answers to similar questions. Requiring the same numbers keeps apart rows that differ
in one figure ("Is bike 3 in stock?" and "Is bike 4 in stock?"), which n-grams of a short text barely tell apart.

Candidates come from a MinHash LSH index over the prompts (`datasketch`); every candidate pair is then verified with
the exact Jaccard similarity of both sides, so a reported pair always meets the threshold. The index can only miss
pairs, rarely: `miss_probability` gives the chance for a pair at a given similarity.

Why MinHash and not sentence embeddings: an encoder (all-MiniLM-L6-v2) embeds ~100 short texts per second on a
2-core CPU, so 10,000 rows (prompts and answers) take minutes, and the cosine similarity of paraphrased questions
(0.90 in the demo set) overlaps with that of different questions (0.94). MinHash handles 10,000 rows in seconds and
flags copy-edits (case, punctuation, a word added or a typo) while leaving paraphrases alone. docs/benchmarks.md has
the measurements.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash
from datasketch import MinHash, MinHashLSH

_NOT_WORD = re.compile(r"[\W_]+")
_NUMBER = re.compile(r"[0-9]+")
# The LSH bands are chosen so that a pair exactly at the threshold is missed with at most this probability (pairs
# above it less often); fewer, wider bands would propose fewer candidates but miss more.
MAX_MISS = 0.01


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with the widest bands whose miss probability at `threshold` is at most MAX_MISS."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= MAX_MISS:
            return bands, rows
    return num_perm, 1


def normalize(text: str) -> str:
    """Case-folded words separated by single spaces (punctuation and symbols dropped)."""
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def shingles(text: str, size: int) -> frozenset[str]:
    """Character n-grams of the normalised text; a text shorter than `size` is its own single shingle."""
    norm = normalize(text)
    if len(norm) <= size:
        return frozenset([norm])
    return frozenset(norm[i : i + size] for i in range(len(norm) - size + 1))


def numbers(text: str) -> tuple[str, ...]:
    """The digit runs of a text, in order."""
    return tuple(_NUMBER.findall(text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class Match:
    """A row that nearly repeats another: the other row's position and the two similarities."""

    other: int
    prompt_similarity: float
    answer_similarity: float


class NearDuplicateIndex:
    """An index of (prompt, answer) rows by position, queried for the rows that a new row nearly repeats."""

    def __init__(self, threshold: float, shingle_size: int, num_perm: int, seed: int = 1):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self.seed = seed
        self._lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
        self._rows: dict[int, tuple[frozenset[str], frozenset[str], tuple[str, ...]]] = {}

    def _minhashes(self, prompt_sets: Sequence[frozenset[str]]) -> list[MinHash]:
        encoded = ([s.encode("utf-8") for s in shingle_set] for shingle_set in prompt_sets)
        return MinHash.bulk(encoded, num_perm=self.num_perm, seed=self.seed, hashfunc=xxhash.xxh32_intdigest)

    def _shingled(self, texts: Sequence[str]) -> list[frozenset[str]]:
        return [shingles(t, self.shingle_size) for t in texts]

    @staticmethod
    def _numbers(prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[str, ...]]:
        return [numbers(p) + ("|",) + numbers(a) for p, a in zip(prompts, answers)]

    def _verified(
        self, minhash: MinHash, row: tuple[frozenset[str], frozenset[str], tuple[str, ...]], first_only: bool
    ) -> list[Match]:
        """Indexed rows that this row nearly repeats, in position order (only the first if asked)."""
        prompt, answer, figures = row
        found = []
        for other in sorted(self._lsh.query(minhash)):
            other_prompt, other_answer, other_figures = self._rows[other]
            if figures != other_figures:
                continue
            p = jaccard(prompt, other_prompt)
            if p < self.threshold:
                continue
            a = jaccard(answer, other_answer)
            if a >= self.threshold:
                found.append(Match(other, round(p, 3), round(a, 3)))
                if first_only:
                    break
        return found

    def _prepared(self, prompts: Sequence[str], answers: Sequence[str]):
        prompt_sets = self._shingled(prompts)
        rows = list(zip(prompt_sets, self._shingled(answers), self._numbers(prompts, answers)))
        return self._minhashes(prompt_sets), rows

    def add_all(self, prompts: Sequence[str], answers: Sequence[str]) -> None:
        """Index rows by their position in these lists."""
        minhashes, rows = self._prepared(prompts, answers)
        for pos, (mh, row) in enumerate(zip(minhashes, rows)):
            self._lsh.insert(pos, mh, check_duplication=False)
            self._rows[pos] = row

    def matches(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[Match]]:
        """For each query row, every indexed row it nearly repeats (in position order)."""
        minhashes, rows = self._prepared(prompts, answers)
        return [self._verified(mh, row, first_only=False) for mh, row in zip(minhashes, rows)]

    def dedupe(self, prompts: Sequence[str], answers: Sequence[str]) -> dict[int, Match]:
        """Index rows in order; a row that nearly repeats an earlier *kept* row is reported and not indexed."""
        minhashes, rows = self._prepared(prompts, answers)
        found: dict[int, Match] = {}
        for pos, (mh, row) in enumerate(zip(minhashes, rows)):
            match = self._verified(mh, row, first_only=True)
            if match:
                found[pos] = match[0]
                continue
            self._lsh.insert(pos, mh, check_duplication=False)
            self._rows[pos] = row
        return found


def near_duplicates(
    prompts: Sequence[str], answers: Sequence[str], *, threshold: float, shingle_size: int, num_perm: int
) -> dict[int, Match]:
    """Rows (by position) that nearly repeat an earlier row that is kept, with that row; first copies are kept."""
    return NearDuplicateIndex(threshold, shingle_size, num_perm).dedupe(prompts, answers)


def near_copies(
    query_prompts: Sequence[str],
    query_answers: Sequence[str],
    ref_prompts: Sequence[str],
    ref_answers: Sequence[str],
    *,
    threshold: float,
    shingle_size: int,
    num_perm: int,
) -> dict[int, list[Match]]:
    """Query rows (by position) that nearly repeat reference rows, with every such reference row."""
    index = NearDuplicateIndex(threshold, shingle_size, num_perm)
    index.add_all(ref_prompts, ref_answers)
    found = index.matches(query_prompts, query_answers)
    return {pos: m for pos, m in enumerate(found) if m}


def miss_probability(similarity: float, threshold: float, num_perm: int) -> float:
    """Chance that the LSH index never proposes a pair whose prompts have this Jaccard similarity."""
    bands, rows = lsh_bands(threshold, num_perm)
    return (1 - similarity**rows) ** bands

"""Text augmentations for the intra-modal (text-text) contrast, seeded by a numpy Generator.

`augment_text`: clause shuffle (clauses split on ','), a small medical synonym table, clause dropout
(never all clauses). `swap_laterality`: exchange "left" and "right" (used when an image is flipped
horizontally, so that a report keeps describing its image).
"""

from __future__ import annotations

import re

import numpy as np

# Groups of interchangeable words; "left"/"right"/"upper"/"lower" never map to each other.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("infection", "opacity", "opacification"),
    ("infected", "affected", "involved"),
    ("area", "region", "focus"),
    ("areas", "regions", "foci"),
    ("lower", "basal"),
    ("upper", "apical"),
    ("middle", "mid"),
    ("lung", "lung field"),
    ("pulmonary", "lung"),
    ("bilateral", "two-sided"),
    ("unilateral", "one-sided"),
    ("no", "without"),
    ("nuclei", "cell nuclei"),
    ("distributed", "spread"),
    ("high", "increased"),
)


def _build_table() -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for group in SYNONYMS:
        for word in group:
            table.setdefault(word, []).extend(w for w in group if w != word)
    return table


_TABLE = _build_table()

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)?")
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_laterality(text: str) -> str:
    """Exchange the words "left" and "right" (keeping their case)."""

    def repl(m: re.Match[str]) -> str:
        w = m.group(0)
        return _match_case("right" if w.lower() == "left" else "left", w)

    return _SIDE.sub(repl, text)


def _synonyms(clause: str, rng: np.random.Generator, p: float) -> str:
    def repl(m: re.Match[str]) -> str:
        w = m.group(0)
        options = _TABLE.get(w.lower())
        if not options or rng.random() >= p:
            return w
        return _match_case(options[int(rng.integers(len(options)))], w)

    return _WORD.sub(repl, clause)


def _decap(clause: str) -> str:
    first = clause.split(" ", 1)[0]
    if len(first) > 1 and first[1:2].isupper():  # an acronym keeps its case
        return clause
    return clause[:1].lower() + clause[1:]


def augment_text(
    text: str,
    rng: np.random.Generator,
    p_shuffle: float = 0.5,
    p_synonym: float = 0.2,
    p_drop: float = 0.2,
) -> str:
    """Shuffle clauses (p_shuffle), replace words by synonyms (p_synonym each), drop clauses (p_drop each)."""
    stripped = text.strip()
    if not stripped:
        return text
    end = stripped[-1] if stripped[-1] in ".!?" else ""
    body = stripped[:-1] if end else stripped
    clauses = [c.strip() for c in body.split(",") if c.strip()]
    if not clauses:
        return text
    if len(clauses) > 1:
        keep = [rng.random() >= p_drop for _ in clauses]
        if not any(keep):
            keep[int(rng.integers(len(clauses)))] = True
        clauses = [c for c, k in zip(clauses, keep) if k]
    if len(clauses) > 1 and rng.random() < p_shuffle:
        clauses = [clauses[i] for i in rng.permutation(len(clauses)).tolist()]
    clauses = [_synonyms(_decap(c), rng, p_synonym) for c in clauses]
    out = ", ".join(clauses) + end
    return out[:1].upper() + out[1:]

"""Vocabulary transfer (VIPI): the rows of a model's vocabulary-indexed tensors for a new tokenizer.

Pure: token strings, ids and tensors in, tensors out; reading tokenizers and model files is
growth/adapters/vocab.py's job. A transfer is planned once (which source rows, with which
weights, make each target row) and the plan is applied to every tensor indexed by the
vocabulary (input embeddings, an untied output layer, output biases), so they stay consistent.

Tokens are compared in a normalised *form* (word_start, text), so that WordPiece's "##ing"
(a continuation) and byte-level BPE's "ing" (no leading-space marker: a continuation) meet,
as do WordPiece's "the" and BPE's "Ġthe" (word starts). The target token's text first goes
through the source tokenizer's normaliser (e.g. lower-casing for bert-base-uncased), because
that is the string the source model would have seen.

For each target token, in order:
  special  a special token takes the row of the source special token with the same role
           (ROLE_SOURCES: [SEP] <-> end-of-text, [CLS] <-> beginning-of-text, ...);
  exact    a token whose form is in the source vocabulary keeps that row bit for bit;
  segmented (VIPI) every segmentation of the text into source tokens with the fewest pieces,
           the first piece a word start (if the token is one) and the others continuations;
           row = mean over the segmentations of the mean of their pieces' rows. If no
           segmentation exists with the token's own start kind, the first piece may be of
           the other kind (e.g. BPE's "(" after a letter is a continuation, WordPiece's "("
           is always a word start). At most MAX_SEGMENTATIONS segmentations are enumerated
           (in a fixed order), which bounds the cost of long repetitive strings;
  random   anything else: a fresh N(0, std^2) row (zero for a bias).
Method 'exact' stops after exact matches (the rest random); method 'random' makes every row
fresh, the baseline "same model, random embedding for the new vocabulary".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .errors import GrowthError

METHODS = ("vipi", "exact", "random")
MAX_SEGMENTATIONS = 32
ROLES = ("eos", "sep", "bos", "cls", "mask", "pad", "unk")  # a token with several roles uses the first
ROLE_SOURCES = {"eos": ("eos", "sep"), "sep": ("sep", "eos"), "bos": ("bos", "cls"), "cls": ("cls", "bos"),
                "mask": ("mask",), "pad": ("pad",), "unk": ("unk",)}

Form = tuple[bool, str]  # (word start, text)


def wordpiece_form(token: str, prefix: str = "##") -> Form:
    """WordPiece: a continuation carries the prefix; anything else starts a word."""
    return (False, token[len(prefix):]) if token.startswith(prefix) and len(token) > len(prefix) else (True, token)


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def byte_level_form(token: str) -> Form | None:
    """Byte-level BPE: the token's bytes; a leading space marks a word start. None when the
    bytes are not whole UTF-8 characters (a piece of a multi-byte character has no text)."""
    try:
        text = bytes(BYTE_DECODER[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None
    return (True, text[1:]) if text.startswith(" ") and len(text) > 1 else (False, text)


@dataclasses.dataclass
class Plan:
    """How each target row is made: rows[i] = [(source id, weight), ...] (weights sum to 1),
    empty for a fresh row; kinds[i] in special/exact/segmented/random."""
    rows: list[list[tuple[int, float]]]
    kinds: list[str]
    specials: dict[str, str | None]  # target special token -> the source token it copies
    examples: dict[str, list[list[str]]]  # a few segmented tokens and their segmentations

    def coverage(self) -> dict[str, int]:
        return {k: self.kinds.count(k) for k in ("special", "exact", "segmented", "random")}


def segmentations(text: str, first_start: bool, index: dict[Form, int], max_len: int,
                  cap: int = MAX_SEGMENTATIONS) -> list[list[int]]:
    """All segmentations of `text` into source tokens with the fewest pieces (at most `cap`):
    dynamic programming over prefixes, then a walk back over the optimal predecessors."""
    def piece(j: int, i: int) -> int | None:
        return index.get((first_start if j == 0 else False, text[j:i]))

    n, inf = len(text), len(text) + 1
    best = [0] + [inf] * n  # best[i]: fewest pieces covering text[:i]
    for i in range(1, n + 1):
        for j in range(max(0, i - max_len), i):
            if best[j] + 1 < best[i] and piece(j, i) is not None:
                best[i] = best[j] + 1
    found: list[list[int]] = []

    def walk(i: int, tail: list[int]) -> None:
        if i == 0:
            found.append(tail[::-1])
            return
        for j in range(max(0, i - max_len), i):
            if len(found) >= cap:
                return
            if best[j] == best[i] - 1 and (p := piece(j, i)) is not None:
                walk(j, tail + [p])

    if n and best[n] < inf:
        walk(n, [])
    return found


def plan_transfer(source_vocab: dict[str, int], target_vocab: dict[str, int],
                  source_form: Callable[[str], Form | None], target_form: Callable[[str], Form | None],
                  normalize: Callable[[str], str], source_roles: dict[str, str], target_roles: dict[str, str],
                  method: str = "vipi", cap: int = MAX_SEGMENTATIONS) -> Plan:
    """The transfer plan. *_roles: role ('cls', 'eos', ...) -> special token string."""
    if method not in METHODS:
        raise GrowthError(f"vocabulary transfer method {method!r}: use one of {', '.join(METHODS)}")
    size = len(target_vocab)
    if sorted(target_vocab.values()) != list(range(size)):
        raise GrowthError("the target tokenizer's ids are not 0..N-1 without gaps")
    source_specials = set(source_roles.values())
    index: dict[Form, int] = {}
    for token, i in sorted(source_vocab.items(), key=lambda kv: kv[1]):
        form = source_form(token)
        if token not in source_specials and form is not None and form[1]:
            index.setdefault(form, i)  # two tokens with one form (rare): the lower id
    max_len = max((len(text) for _, text in index), default=1)
    roles_of: dict[str, list[str]] = {}
    for role in ROLES:
        if role in target_roles:
            roles_of.setdefault(target_roles[role], []).append(role)

    rows: list[list[tuple[int, float]]] = [[] for _ in range(size)]
    kinds, specials, examples = ["random"] * size, {}, {}
    names = {i: token for token, i in source_vocab.items()}
    for token, t in sorted(target_vocab.items(), key=lambda kv: kv[1]):  # by id: tokenizers' own order varies
        if method == "random":
            continue
        if token in roles_of:
            candidates = [source_roles[r] for role in roles_of[token] for r in ROLE_SOURCES[role] if r in source_roles]
            specials[token] = candidates[0] if candidates else None
            if candidates:
                rows[t], kinds[t] = [(source_vocab[candidates[0]], 1.0)], "special"
            continue
        form = target_form(token)
        if form is None:
            continue
        start, text = form[0], normalize(form[1])
        if (start, text) in index:
            rows[t], kinds[t] = [(index[(start, text)], 1.0)], "exact"
            continue
        if method != "vipi" or not text:
            continue
        segs = segmentations(text, start, index, max_len, cap) or segmentations(text, not start, index, max_len, cap)
        if segs:
            weights: dict[int, float] = {}
            for seg in segs:
                for p in seg:
                    weights[p] = weights.get(p, 0.0) + 1.0 / (len(segs) * len(seg))
            rows[t], kinds[t] = sorted(weights.items()), "segmented"
            if len(examples) < 10:
                examples[token] = [[names[p] for p in seg] for seg in segs[:3]]
    return Plan(rows, kinds, specials, examples)


def apply_plan(plan: Plan, source: torch.Tensor, fresh_std: float | None, gen: torch.Generator) -> torch.Tensor:
    """The target tensor (rows along dim 0): weighted sums of source rows, computed in float32
    (a single source row with weight 1 is copied bit for bit); fresh rows are N(0, fresh_std^2),
    or zeros when fresh_std is None (biases)."""
    out = torch.zeros((len(plan.rows), *source.shape[1:]), dtype=torch.float32)
    fresh = [i for i, r in enumerate(plan.rows) if not r]
    if fresh and fresh_std is not None:
        out[fresh] = torch.randn((len(fresh), *source.shape[1:]), generator=gen) * fresh_std
    pairs = [(t, s, w) for t, r in enumerate(plan.rows) for s, w in r]
    if pairs:
        t, s, w = (torch.tensor(x) for x in zip(*pairs))
        if s.max() >= source.shape[0]:
            raise GrowthError(f"source token id {int(s.max())} is past the model's {source.shape[0]} rows")
        picked = source[s].float() * w.float().view(-1, *[1] * (source.dim() - 1))
        out.index_add_(0, t, picked)
    return out.to(source.dtype)

"""Log-probabilities of chosen tokens and of the top k, from the model's raw logits (vLLM's default
`raw_logprobs`: before logit bias, penalties, temperature and top-k/top-p/min-p), batched per step over the
rows that ask for them; token strings decoded on the engine thread (the API has no tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Candidate:
    """One token and its logprob."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """A chosen (or prompt) token, its logprob (None for a prompt's first token), and the `top` most likely
    tokens at its position."""

    token_id: int
    token: str
    logprob: float | None
    top: list[Candidate] = field(default_factory=list)


SCORE_ROWS = 512  # rows log-softmaxed at once: a 2,048-token prompt chunk of a 150k vocabulary stays ~300 MB


def score(logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int]) -> list[tuple[float, list[int],
                                                                                           list[float]]]:
    """Per row of raw `logits` [rows, vocab]: the logprob of `targets[i]` and the ids and logprobs of its
    `ks[i]` most likely tokens (one log-softmax and one top-k per slice of SCORE_ROWS rows)."""
    out: list[tuple[float, list[int], list[float]]] = []
    for lo in range(0, logits.shape[0], SCORE_ROWS):
        hi = min(lo + SCORE_ROWS, logits.shape[0])
        lp = torch.log_softmax(logits[lo:hi].float(), dim=-1)
        tgt = torch.tensor(list(targets[lo:hi]), dtype=torch.int64, device=lp.device).unsqueeze(1)
        chosen = lp.gather(1, tgt).squeeze(1).tolist()
        k = min(max(ks[lo:hi]), lp.shape[-1])
        if k == 0:
            out += [(c, [], []) for c in chosen]
            continue
        vals, ids = lp.topk(k, dim=-1)
        out += [(c, i[:n], v[:n]) for c, i, v, n in zip(chosen, ids.tolist(), vals.tolist(), ks[lo:hi])]
    return out


class Decoder:
    """Token strings of single ids as the tokenizer decodes them (special tokens kept), remembered per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._seen: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The text of one token."""
        text = self._seen.get(token_id)
        if text is None:
            text = self._seen[token_id] = self.tokenizer.decode([token_id])
        return text

    def entry(self, token_id: int, scored: tuple[float, list[int], list[float]]) -> TokenLogprob:
        """A `TokenLogprob` from one row of `score`."""
        chosen, ids, vals = scored
        return TokenLogprob(token_id, self(token_id), chosen, [Candidate(i, self(i), v) for i, v in zip(ids, vals)])

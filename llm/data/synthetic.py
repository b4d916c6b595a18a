"""SyntheticCorpus: text from a random sparse Markov chain whose entropy rate is known exactly."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llm.data.corpus import check_split, fingerprint, split_documents

SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class SyntheticCorpus:
    """Documents sampled from a seeded first-order Markov chain over single ASCII characters.

    Each state i has `branching` successors: itself (so the chain is aperiodic), i + 1 mod n
    (so it is irreducible), and random others, weighted by Dirichlet(1) probabilities. Every
    document starts from the stationary distribution, so each position has the same law.

    The point is a known answer: with the `byte` tokenizer each symbol is one token, so a model's
    per-token loss cannot go below `entropy_rate` (nats). Documents are separated by EOS, which
    adds one more-or-less predictable token per document and makes the first symbol cost the
    stationary entropy rather than the rate: a negligible correction for long documents.
    """

    def __init__(self, n_symbols: int = 16, branching: int = 3, n_documents: int = 200,
                 doc_length: int = 2048, val_documents: int = 20, seed: int = 0):
        if not 2 <= n_symbols <= len(SYMBOLS):
            raise ValueError(f"n_symbols must be in [2, {len(SYMBOLS)}], got {n_symbols}")
        if not 2 <= branching <= n_symbols:
            raise ValueError(f"branching must be in [2, n_symbols={n_symbols}], got {branching}")
        if doc_length < 1 or n_documents < 0 or val_documents < 0:
            raise ValueError("doc_length must be >= 1 and the document counts >= 0")
        self.name = "synthetic"
        self.symbols = SYMBOLS[:n_symbols]
        self.n_documents = {"train": n_documents, "val": val_documents}
        self.doc_length = doc_length
        self.seed = seed
        self.transition_matrix = _transition_matrix(n_symbols, branching, np.random.default_rng([seed, 0]))
        self.stationary = _stationary(self.transition_matrix)
        self._settings = {"corpus": "synthetic", "n_symbols": n_symbols, "branching": branching,
                          "n_documents": n_documents, "doc_length": doc_length,
                          "val_documents": val_documents, "seed": seed}
        self._fingerprint: str | None = None

    @property
    def entropy_rate(self) -> float:
        """H = -sum_i pi_i sum_j P_ij ln P_ij, in nats per symbol."""
        p = self.transition_matrix
        logp = np.log(p, where=p > 0, out=np.zeros_like(p))
        return float(-(self.stationary[:, None] * p * logp).sum())

    def sample(self, n_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n_sequences, length) state indices; all sequences advance together, one step a loop."""
        cumulative = np.cumsum(self.transition_matrix, axis=1)
        last = len(self.symbols) - 1
        states = np.empty((n_sequences, length), dtype=np.int64)
        states[:, 0] = rng.choice(len(self.symbols), size=n_sequences, p=self.stationary)
        for t in range(1, length):
            u = rng.random(n_sequences)
            # The next state is the first j with cumulative[j] > u; min() guards rounding at 1.
            nxt = (cumulative[states[:, t - 1]] <= u[:, None]).sum(axis=1)
            states[:, t] = np.minimum(nxt, last)
        return states

    def documents(self, split: str) -> Iterator[str]:
        n = self.n_documents[check_split(split)]
        if n == 0:
            return
        rng = np.random.default_rng([self.seed, 1 if split == "train" else 2])
        table = np.frombuffer(self.symbols.encode("ascii"), dtype=np.uint8)
        for row in self.sample(n, self.doc_length, rng):
            yield table[row].tobytes().decode("ascii")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._settings, split_documents(self))
        return self._fingerprint


def _transition_matrix(n: int, branching: int, rng: np.random.Generator) -> np.ndarray:
    p = np.zeros((n, n))
    for i in range(n):
        fixed = [i, (i + 1) % n]  # distinct, as n >= 2
        others = [j for j in range(n) if j not in fixed]
        extra = rng.choice(others, size=branching - 2, replace=False).tolist()
        successors = fixed + extra
        p[i, successors] = rng.dirichlet(np.ones(len(successors)))
    return p


def _stationary(p: np.ndarray) -> np.ndarray:
    """The left eigenvector of P for eigenvalue 1, normalised to a distribution."""
    values, vectors = np.linalg.eig(p.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return pi / pi.sum()

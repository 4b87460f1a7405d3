"""Question embeddings and their K-means clusters, for the schedule's diversity term (Eq. 12).

The KPOD paper embeds a question as the mean of its GloVe vectors. We use the same idea with
what the student already has: the mean of the student's input embeddings over the question's
tokens (`student_mean`), or TF-IDF vectors of the question text (`tfidf`), which separate
questions better when the student's embeddings are a random initialisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def student_mean_embeddings(model: Any, tokenizer: Any, questions: list[str]) -> np.ndarray:
    """[N, hidden]: the mean of the student's input embedding rows over each question's tokens.

    Special tokens (BOS/EOS) are left out so they do not pull every question to one point.
    """
    table = model.get_input_embeddings().weight.detach().float()  # [V, hidden]
    out = np.zeros((len(questions), table.shape[1]), dtype=np.float64)
    for i, q in enumerate(questions):
        ids = tokenizer(q, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"question {i} has no tokens: {q!r}")
        out[i] = table[torch.tensor(ids)].mean(dim=0).double().numpy()
    return out


def tfidf_embeddings(questions: list[str]) -> np.ndarray:
    """[N, vocab]: L2-normalised TF-IDF vectors of the question texts (dense)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    # the default token pattern drops one-character tokens; keep digits and short words
    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b")
    return vec.fit_transform(questions).toarray()


def kmeans_clusters(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[N] cluster ids in [0, min(k, distinct rows)) from seeded K-means on `x` [N, dim]."""
    from sklearn.cluster import KMeans

    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    distinct = len(np.unique(x, axis=0))
    k = max(1, min(k, distinct))  # K-means cannot make more clusters than distinct points
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    km = KMeans(n_clusters=k, random_state=seed, n_init=10)
    return km.fit_predict(x).astype(np.int64)

"""k-nearest-neighbour classification of frozen features (DINO's weighted kNN).

[ours, following DINO ``eval_knn.py``] Features are L2-normalised; each test sample takes its ``k`` most
cosine-similar training samples and every neighbour votes for its class with weight ``exp(similarity / T)``
(k = 20, T = 0.07 by default). With ``temperature=None`` the vote is a plain majority (ties: nearest wins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
                temperature: float | None = 0.07, num_classes: int | None = None) -> np.ndarray:  # fmt: skip
    """Predicted class of each row of ``test_x`` (N_test,) from labelled ``train_x`` (N_train, D)."""
    if len(train_x) == 0:
        raise ValueError("kNN needs at least one training sample")
    c = int(num_classes or train_y.max() + 1)
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T  # (N_test, N_train) cosine similarity
    k = min(k, len(train_x))
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (N_test, k), nearest first
    s = np.take_along_axis(sim, idx, 1)
    w = np.exp(s / temperature) if temperature is not None else np.ones_like(s) + 1e-6 * (k - np.arange(k))
    votes = np.zeros((len(test_x), c))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[idx]), w)
    return votes.argmax(1)


@dataclass
class KnnResult:
    """Accuracy of one kNN evaluation."""

    accuracy: float
    n_train: int
    n_test: int
    k: int
    temperature: float | None
    per_class: dict[str, float]


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20,
                 temperature: float | None = 0.07, classes: list[str] | None = None) -> KnnResult:  # fmt: skip
    """Top-1 accuracy (and per-class accuracy) of :func:`knn_predict` on ``test_x``."""
    n = len(classes) if classes else int(max(train_y.max(), test_y.max()) + 1)
    pred = knn_predict(train_x, train_y, test_x, k, temperature, n)
    names = classes or [str(i) for i in range(n)]
    per = {names[i]: float((pred[test_y == i] == i).mean()) for i in range(n) if (test_y == i).any()}
    return KnnResult(float((pred == test_y).mean()), len(train_x), len(test_x), k, temperature, per)

"""Linear probes on frozen features: logistic regression (scene classes) and one-vs-rest (multi-label, mAP).

[ours] Features are standardised (fit on train); the inverse regularisation strength ``C`` is chosen from a small
grid by cross-validation on the training set only (5 folds, or fewer when a class has fewer samples), so the test
set is touched once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class LinearResult:
    """Accuracy of one linear probe."""

    accuracy: float
    n_train: int
    n_test: int
    C: float


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, c_grid: tuple[float, ...] = C_GRID,
                     seed: int = 0) -> tuple[Pipeline, float]:  # fmt: skip
    """Standardiser + multinomial logistic regression, ``C`` picked by stratified CV (folds shuffled by ``seed``).

    Returns:
        The fitted pipeline and the chosen ``C``; score it on as many test sets as needed.
    """
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = int(min(5, np.bincount(train_y).min()))
    if folds < 2:
        return pipe.set_params(logisticregression__C=1.0).fit(train_x, train_y), 1.0
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    search = GridSearchCV(pipe, {"logisticregression__C": list(c_grid)}, cv=cv)
    search.fit(train_x, train_y)
    return search.best_estimator_, float(search.best_params_["logisticregression__C"])


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c_grid: tuple[float, ...] = C_GRID, seed: int = 0) -> LinearResult:  # fmt: skip
    """Multinomial logistic regression with ``C`` picked by stratified CV on train; top-1 accuracy on test."""
    model, c = fit_linear_probe(train_x, train_y, c_grid, seed)
    acc = float((model.predict(test_x) == test_y).mean())
    return LinearResult(acc, len(train_x), len(test_x), c)


@dataclass
class MultiLabelResult:
    """Mean average precision of a multi-label probe."""

    mAP: float
    n_train: int
    n_test: int
    classes_scored: int
    per_class_ap: dict[str, float]


def multilabel_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     classes: list[str], C: float = 1.0) -> MultiLabelResult:  # fmt: skip
    """One-vs-rest logistic regression; macro mAP over the classes with a positive in test and in train.

    Classes without a training positive cannot be learnt and classes without a test positive have no defined
    AP, so both are left out of the mean (``classes_scored`` says how many remain).
    """
    keep = np.flatnonzero((train_y.sum(0) > 0) & (train_y.sum(0) < len(train_y)))
    scaler = StandardScaler().fit(train_x)
    clf = OneVsRestClassifier(LogisticRegression(max_iter=5000, C=C))
    clf.fit(scaler.transform(train_x), train_y[:, keep])
    scores = clf.predict_proba(scaler.transform(test_x))
    aps = {}
    for j, c in enumerate(keep):
        if test_y[:, c].any():
            aps[classes[c]] = float(average_precision_score(test_y[:, c], scores[:, j]))
    m = float(np.mean(list(aps.values()))) if aps else float("nan")
    return MultiLabelResult(m, len(train_x), len(test_x), len(aps), aps)

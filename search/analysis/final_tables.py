"""The final evaluation as the report shows it: a table over seeds, class names, the confusion
matrix and the t-SNE embedding of the reference model's features. The retraining itself is the
runner's (`search.runner.final_models`); this module only reads its results."""

from __future__ import annotations

import numpy as np
import pandas as pd

from search.training.results import FinalEvaluation, TestPredictions


def final_table(evaluation: FinalEvaluation) -> pd.DataFrame:
    rows = []
    for result in evaluation.results:
        std = result.std
        rows.append({
            "configuration": result.label, "trial": result.trial_number,
            "val_accuracy (search)": result.val_accuracy,
            "test accuracy": f"{result.mean:.4f} ± {std:.4f}" if std is not None
                             else f"{result.mean:.4f} (1 seed)",
            "test_accuracy_mean": result.mean, "test_accuracy_std": std,
            "per seed": ", ".join(f"{a:.4f}" for a in result.test_accuracies),
            "seeds": len(result.test_accuracies), "train_seconds (mean)": result.train_seconds,
        })
    return pd.DataFrame(rows)


def confusion(predictions: TestPredictions, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(predictions.labels, predictions.predicted, labels=range(num_classes))


def tsne_embedding(predictions: TestPredictions, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the penultimate features (scikit-learn; PCA init for a stable layout)."""
    from sklearn.manifold import TSNE

    n = len(predictions.features)
    perplexity = float(min(30, max(2, (n - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto").fit_transform(predictions.features)

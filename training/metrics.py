"""Task metrics from Trainer predictions: classification, regression, causal LM."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from adapters.config import TaskType

# What "best" means when Trainer picks the checkpoint to keep.
BEST_METRIC: dict[TaskType, tuple[str, bool]] = {
    "seq_cls": ("accuracy", True),
    "regression": ("pearson", True),
    "causal_lm": ("loss", False),
}


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = logits.argmax(-1)
    average = "binary" if logits.shape[-1] == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average=average, zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    predictions = predictions.reshape(-1)
    if np.std(predictions) == 0:  # correlations are undefined for a constant prediction
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((predictions - targets) ** 2))}
    return {
        "pearson": float(pearsonr(predictions, targets).statistic),
        "spearman": float(spearmanr(predictions, targets).statistic),
        "mse": float(np.mean((predictions - targets) ** 2)),
    }


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))


def metrics_for(task_type: TaskType):
    """A Trainer `compute_metrics` function for the task (None for causal LM: loss only)."""
    if task_type == "causal_lm":
        return None

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        if task_type == "regression":
            return regression_metrics(logits, prediction.label_ids)
        return classification_metrics(logits, prediction.label_ids)

    return compute

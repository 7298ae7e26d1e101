"""Hyperparameter searches for image classifiers with Optuna, tracked in MLflow."""

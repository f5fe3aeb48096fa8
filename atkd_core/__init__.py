"""atkd_core: the pure ML library of the ATKD distillation pipeline (no prefect, no mlflow)."""

__version__ = "0.1.0"

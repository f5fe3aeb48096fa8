"""infra: environment settings, MLflow tracking helpers, the DeepSpeed launcher, local servers (docs/architecture.md)."""

"""infra: settings, MLflow tracking helpers, DeepSpeed config rendering, launchers, servers."""

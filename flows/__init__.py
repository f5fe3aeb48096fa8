"""flows: Prefect flows composing the stage tasks, and the ``atkd`` command line."""

from infra.settings import apply_environment_defaults

# Here rather than in the CLI alone: a Prefect worker imports the flow module directly, and these
# must be set before transformers, datasets or mlflow read them.
apply_environment_defaults()

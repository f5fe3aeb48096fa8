"""flows: Prefect flows composing the stage tasks, and the ``atkd`` command line."""

"""flows: Prefect flows composing the stage tasks, and the ``atkd`` command line.

Importing this package changes nothing in the process: the environment defaults
(``infra.settings``) are applied by the entry points, the ``atkd`` command and each flow's body.
"""

"""Subcommands of the ``excelseg`` CLI; each module has ``register(subparsers)`` and a ``run(args)``."""

"""Deprecated: moved to :mod:`excelseg.jobs` (one per-image job runner for files and dataset ids); the old names
still work for one release, with a ``DeprecationWarning``."""

from ._deprecated import moved, names_of

__getattr__ = moved(__name__, {
    **names_of("excelseg.jobs.runner", "Shard prefetch"),
    **names_of("excelseg.jobs.labels", "LabelOutput iter_pseudo_labels"),
    **names_of("excelseg.vocab", "dataset_vocabulary"),
})

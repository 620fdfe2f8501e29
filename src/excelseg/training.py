"""Deprecated: moved to :mod:`excelseg.train.step`; the old names still work for one release, with a
``DeprecationWarning``."""

from ._deprecated import moved, names_of

__getattr__ = moved(__name__, names_of("excelseg.train.step", """StepLosses check_batch training_losses uses_lvc
    uses_self_affinity"""))

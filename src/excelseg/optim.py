"""Deprecated: moved to :mod:`excelseg.train.optim`; the old names still work for one release, with a
``DeprecationWarning``."""

from ._deprecated import moved, names_of

__getattr__ = moved(__name__, names_of("excelseg.train.optim", """GROUP_NAMES base_lrs build_optimizer group_lrs
    lr_multiplier param_groups set_lrs"""))

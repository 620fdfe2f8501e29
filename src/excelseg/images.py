"""Deprecated: moved to :mod:`excelseg.io.images`; the old names still work for one release, with a
``DeprecationWarning``."""

from ._deprecated import moved, names_of

__getattr__ = moved(__name__, names_of("excelseg.io.images", """IMAGE_EXTENSIONS MAX_PIXELS WHITE ImageReadError
    PathLike check_layout collect_images exif_swaps_sides one_line pil_to_rgb read_image to_rgb_array"""))

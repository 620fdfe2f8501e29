"""Real photographs every installation can have: scikit-image's bundled samples, each with fitting class names.

Used by ``excelseg demo`` (with real CLIP weights) and as the example images of ``excelseg app``. Nothing is shipped
here: the photos come with scikit-image (``pip install 'excelseg[demo]'``).
"""

from __future__ import annotations

from pathlib import Path

# (scikit-image data file, classes present in it)
SAMPLE_PHOTOS = (
    ("chelsea.png", "cat"),
    ("astronaut.png", "person,flag"),
    ("coffee.png", "cup,saucer,spoon"),
    ("motorcycle_left.png", "motorbike"),
    ("rocket.jpg", "rocket,tree"),
)


def sample_photos() -> list[tuple[Path, str]]:
    """``(path, comma-separated classes)`` of the sample photos present in this installation (possibly none).

    Raises:
        ImportError: scikit-image is not installed (the message names the extra).
    """
    try:
        import skimage
    except ImportError:
        raise ImportError("the sample photos come from scikit-image: pip install 'excelseg[demo]'") from None
    data_dir = Path(skimage.__file__).parent / "data"
    return [(data_dir / name, classes) for name, classes in SAMPLE_PHOTOS if (data_dir / name).is_file()]

"""Deprecated: the writers moved to :mod:`excelseg.io` and the per-image outputs of ``cam`` / ``pseudo-label`` to
:mod:`excelseg.jobs`; every old name still works for one release, with a ``DeprecationWarning`` naming its new home.
"""

from ._deprecated import moved, names_of

__getattr__ = moved(__name__, {
    **names_of("excelseg.io.palette", "IGNORE_INDEX VOC_PALETTE voc_palette"),
    **names_of("excelseg.io.files", """atomic_path atomic_write read_label_png remove_stale_temps save_jpeg save_json
        save_label_png save_npz save_png"""),
    **names_of("excelseg.io.cams", "CAM_SIZE_RANGE cam_archive cam_size_for parse_cam_size read_cam_archive"),
    **names_of("excelseg.jobs.outputs", """OVERLAY_MAX_SIDE OVERLAY_MIN_SIDE cams_path is_done label_path overlay_path
        stale_temps_of write_outputs write_result"""),
})

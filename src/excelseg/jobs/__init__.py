"""The per-image jobs of ``cam``, ``segment`` and ``pseudo-label``, for image files and dataset ids alike.

:mod:`.runner` shards, decodes, resumes, overlaps and writes in the background (:class:`~.runner.ImageJob`);
:mod:`.labels` turns decoded batches into pseudo-labels; :mod:`.outputs` is the per-image file contract
(``<stem>.png``, ``<stem>_overlay.jpg``, ``<stem>_cams.npz``, unique names per input) and tells a re-run which
images are done; :mod:`.manifest` is the run manifest (``excelseg_run.json``) that says what made a folder's outputs.
"""

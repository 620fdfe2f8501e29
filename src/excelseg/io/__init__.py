"""Plumbing under the method: reading images safely (:mod:`.images`), atomic files and masks (:mod:`.files`), the
label palette (:mod:`.palette`), CAM archives (:mod:`.cams`) and excelseg's checkpoint format (:mod:`.checkpoint`).

Import from the submodules; this package file hands nothing on, so importing one part loads only that part.
"""

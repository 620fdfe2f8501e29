"""Where a command's outputs go: checks that an output folder or file can be written (creating nothing until
every check has passed), the run manifest that makes a folder resumable and refuses mixing settings
(:mod:`excelseg.jobs.manifest`), the resolved settings written beside the outputs, and metrics files.

Like :mod:`.common`, imported when the ``excelseg`` parser is built: standard library only at module level."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import CliError

RESOLVED_CONFIG_NAME = "excelseg_config.yaml"


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names of input images, unique per input (:func:`excelseg.jobs.outputs.output_names`)."""
    from ..jobs.outputs import output_names

    return output_names(paths)


def write_resolved_config(out_dir: Path, cfg, **extra: Any) -> Path:
    """Write the resolved settings next to a command's outputs (``excelseg_config.yaml``), atomically."""
    from ..config import dump_config
    from ..io.files import atomic_write

    text = dump_config(cfg, **extra)
    return atomic_write(Path(out_dir) / RESOLVED_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


# ---- files ----------------------------------------------------------------------------------------------------


def check_writable(out_dir: Path) -> None:
    """Prove that ``out_dir`` can be written — or created, by writing into its nearest existing parent — creating
    nothing (a command that is refused later leaves no empty folder behind), or raise a one-line CliError.
    :func:`make_out_dir` creates it once the command is about to write."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"output directory {out_dir} is not writable ({probe} is not a directory)")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CliError(f"output directory {out_dir} is not writable ({exc.strerror or exc})") from None


def make_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (after every check has passed), or raise a one-line CliError."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the output directory {out_dir} ({exc.strerror or exc})") from None


# ---- run manifests: outputs that know what made them ------------------------------------------------------------


def check_run_folder(out_dir: Path, manifest: dict, *, overwrite: bool, done: int = 0, total: int = 0,
                     what: str = "image") -> bool:
    """Compare the run ``manifest`` with the one stored in ``out_dir`` (:mod:`excelseg.jobs.manifest`) before
    anything is written. Returns True when the folder continues the same run (finished outputs may be skipped),
    False when the manifest is to be (re)written. Refuses (CliError, exit 2) a folder made by other settings,
    or holding ``done`` finished outputs of this run's inputs without a manifest, unless ``overwrite``."""
    from .._version import __version__
    from ..jobs.manifest import MANIFEST_NAME, describe_differences, differences, read_manifest

    redo = f"add --overwrite to redo every {what}, or choose another --out-dir"
    try:
        stored = read_manifest(out_dir)
    except ValueError as exc:
        if overwrite:
            return False
        raise CliError(f"{exc}: {redo}") from None
    if stored is None:
        if done and not overwrite:
            raise CliError(f"{out_dir} holds the outputs of {done} of these {total} {what}s but no run manifest "
                           f"({MANIFEST_NAME}; made by an older excelseg?), so what made them is unknown: {redo}")
        return False
    diffs = differences(stored, manifest)
    if diffs:
        if not overwrite:
            raise CliError(f"{out_dir} holds the results of a run with other settings ({describe_differences(diffs)})"
                           f": use the same settings to resume it, {redo}")
        print(f"note: --overwrite: {out_dir} held results of other settings ({describe_differences(diffs)}); its "
              f"run manifest is replaced and every {what} of this run is redone (outputs of other {what}s that the "
              "earlier run left stay as they were)")
        return False
    if stored.get("excelseg_version") != __version__:
        print(f"note: {out_dir} was started by excelseg {stored.get('excelseg_version')}; this is {__version__} "
              "(same settings: resuming; --overwrite redoes everything with this version)")
    return not overwrite


def commit_run_folder(out_dir: Path, manifest: dict, cfg: Any, resumed: bool, **config_extra: Any) -> None:
    """Create ``out_dir`` and, unless the run is ``resumed`` (same manifest), write the run manifest and the
    resolved settings (:func:`write_resolved_config`) before the first output."""
    from ..jobs.manifest import write_manifest

    make_out_dir(out_dir)
    if not resumed:
        write_manifest(out_dir, manifest)
        write_resolved_config(out_dir, cfg, **config_extra)


def check_out_file(out: Path, example: str = "out.json") -> None:
    """``--out`` names a file that can be written — its folder, or the nearest existing parent of it, is
    writable — or a one-line CliError. Nothing is created (the writer creates the folder)."""
    out = Path(out)
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name such as {out / example}")
    probe = out.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CliError(f"cannot write {out} ({exc.strerror or exc})") from None


def write_metrics_json(path: Path, obj: dict[str, Any], explicit: bool) -> None:
    """Write a metrics JSON; a failure is an error when the user named the file, else a warning."""
    from ..io.files import save_json

    try:
        save_json(path, obj)
        print(f"metrics written to {path}")
    except OSError as exc:
        if explicit:
            raise CliError(f"cannot write {path} ({exc.strerror or exc})") from None
        print(f"warning: cannot write {path} ({exc.strerror or exc}); use --out", file=sys.stderr)

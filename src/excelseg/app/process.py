"""``excelseg app`` in a child process: what the browser test and the load check start."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def app_process(args: list[str], home: str | os.PathLike, *, timeout: float = 180.0):
    """``excelseg app ARGS`` in a child process on a free loopback port, offline (no downloads, analytics off,
    one torch thread) with ``home`` as its HOME, cache and Gradio temp folder; yields ``(process, url)`` once the
    page answers, and stops the process on exit. Raises RuntimeError with the process's log when it does not
    come up within ``timeout`` seconds."""
    import subprocess
    import sys
    import urllib.request

    home = Path(home)
    port = free_port()
    env = {**os.environ, "HOME": str(home), "EXCELSEG_CACHE": str(home / "cache"), "EXCELSEG_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(home / "gradio")}
    env.pop("EXCELSEG_CLIP", None)
    package_root = str(Path(__file__).resolve().parents[2])  # this copy of excelseg, installed or not
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log_path = home / "app.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "excelseg.cli", "app", *args, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"excelseg app exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"excelseg app did not serve {url} within {timeout:.0f} s:\n"
                                       f"{log_path.read_text()}") from None
                time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

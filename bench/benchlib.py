"""Helpers shared by the small bench scripts (fairness.py, exthdr.py, metrics_ab.py)."""

import socket
import time


def wait_socket(path, proc, timeout=20):
    """Wait until the server @proc accepts on unix socket @path; raise if it exits or
    does not listen within @timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")

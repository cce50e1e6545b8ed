"""The pipeline under real interruptions, numba's strictest threading layer, and late failures."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import converter.writer as writer_module
from converter.errors import OutputError
from converter.layout import FluxGeometry
from converter.pipeline import convert
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("robust") / "tiny.safetensors"
    write_synthetic_flux(path, GEO, seed=11)
    return path


def test_sigint_mid_conversion_leaves_no_files(src, tmp_path):
    """A real SIGINT (delivered to the main thread) while tensors are being processed."""
    marker = tmp_path / "started"
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        from converter.errors import FluxGGUFError
        from converter.pipeline import convert
        # A suite started in the background (`cmd &`, nohup) inherits SIGINT ignored, and Python then
        # installs no handler: restore Ctrl-C's KeyboardInterrupt, which is what this test is about.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def slow(name, x):
            pathlib.Path({str(marker)!r}).touch()
            # The SIGINT lands here: the conversion cannot finish first on a busy machine. Short sleeps:
            # the kernel may hand the signal to another thread, and Python raises KeyboardInterrupt
            # in the main thread only when it next runs bytecode (not in the middle of one long sleep).
            for _ in range(600):
                time.sleep(0.1)
            return x
        try:
            convert({str(src)!r}, {str(out)!r}, ["Q4_K_M", "Q8_0"], tensor_transform=slow)
        except FluxGGUFError as e:
            print("Error:", e)
            sys.exit(1)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()
    os.kill(child.pid, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 1, (stdout, stderr)
    assert stdout.startswith(f"Error: {out / 'tiny-Q4_K_M.gguf'}, {out / 'tiny-Q8_0.gguf'} were not written: tensor ")
    assert stdout.rstrip().endswith(": interrupted")
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == []


def test_lora_merge_under_the_workqueue_threading_layer(tmp_path):
    """Parallel kernels are launched from one thread only: the workqueue layer aborts otherwise."""
    from lora_fixtures import GEO as LGEO
    from lora_fixtures import make_truth, write_kohya

    write_synthetic_flux(tmp_path / "m.safetensors", LGEO, seed=2)
    write_kohya(tmp_path / "l.safetensors", make_truth(LGEO, seed=3))
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    cmd = [sys.executable, "-c", "from converter.cli import main; main()", "convert", str(tmp_path / "m.safetensors"),
           "-o", str(tmp_path / "out"), "--variant", "Q8_0", "--variant", "Q4_K_M",
           "--lora", f"{tmp_path / 'l.safetensors'}:0.5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m-Q4_K_M.gguf", "m-Q8_0.gguf"]


def test_no_file_is_renamed_before_every_file_is_on_disk(src, tmp_path, monkeypatch):
    """A failure while syncing the second file leaves neither file under its final name."""
    calls = []
    real_sync = writer_module.GGUFStreamWriter.sync

    def sync(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise OutputError(f"disk full while writing {self.path}")
        real_sync(self)

    monkeypatch.setattr(writer_module.GGUFStreamWriter, "sync", sync)
    with pytest.raises(OutputError, match="disk full while writing"):
        convert(src, tmp_path, ["Q4_K_M", "Q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_rename_names_what_was_and_was_not_written(src, tmp_path, monkeypatch):
    real_commit = writer_module.GGUFStreamWriter.commit
    calls = []

    def commit(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        return real_commit(self)

    monkeypatch.setattr(writer_module.GGUFStreamWriter, "commit", commit)
    with pytest.raises(OutputError) as e:
        convert(src, tmp_path, ["Q4_K_M", "Q8_0"])
    assert str(e.value) == (f"{tmp_path / 'tiny-Q8_0.gguf'} was not written: interrupted "
                            f"({tmp_path / 'tiny-Q4_K_M.gguf'} was complete)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-Q4_K_M.gguf"]


def test_a_full_disk_in_a_writer_thread_fails_the_conversion_cleanly(src, tmp_path, monkeypatch):
    """A write that fails on one of a file's writer threads (here: the disk fills up after a few
    tensors) ends the conversion with one error naming the file, and leaves no file, partial or not."""
    import errno
    import threading

    real, calls, lock = writer_module.os.pwrite, [0], threading.Lock()

    def filling(fd, data, offset):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", filling)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        convert(src, out, ["Q4_K_M", "Q8_0"], threads=2)
    assert "disk full while writing" in str(e.value)
    assert str(out / "tiny-Q4_K_M.gguf") in str(e.value) or str(out / "tiny-Q8_0.gguf") in str(e.value)
    assert calls[0] > 5
    assert sorted(p.name for p in out.iterdir()) == []

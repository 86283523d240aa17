"""The C++ op is compiled once, visibly: a first build says so on screen (and how long it took), a
build made ahead of time (`make setup`, the Docker image: python -m trainer.optim.build_ext) is
loaded as it is, with no compiler or ninja on the PATH."""
import logging
import os
import shutil
import subprocess
import sys

import pytest

from trainer.optim import kernel


@pytest.fixture
def fresh_loader(monkeypatch):
    monkeypatch.setattr(kernel, "_EXT", None)
    monkeypatch.setattr(kernel, "_EXT_FAILED", False)
    monkeypatch.delenv("TAILREC_NO_EXT", raising=False)


def test_prebuilt_op_loads_without_a_compiler(tmp_path, monkeypatch, fresh_loader):
    if kernel.load_extension() is None:
        pytest.skip("C++ extension unavailable here")
    name, build = kernel.ext_build_dir()
    kernel._EXT, kernel._EXT_FAILED = None, False
    monkeypatch.setenv("TAILREC_EXT_DIR", str(tmp_path))
    _, new_build = kernel.ext_build_dir()
    os.makedirs(new_build)
    shutil.copy(os.path.join(build, f"{name}.so"), new_build)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))   # no c++, no ninja
    ext = kernel.load_extension()
    assert ext is not None and callable(ext.tailrec_update)


def test_a_first_build_is_announced_and_a_failed_one_explained(tmp_path, monkeypatch, fresh_loader, caplog):
    monkeypatch.setenv("TAILREC_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))    # the compile cannot succeed here
    with caplog.at_level(logging.WARNING, logger=kernel.log.name):
        assert kernel.load_extension() is None
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("compiling the tailrec C++ kernel into " + str(tmp_path)) for m in msgs), msgs
    assert any("unavailable, using the pure-torch path" in m for m in msgs), msgs


def test_build_ext_cli_requires_the_op_when_asked(tmp_path):
    env = {**os.environ, "TAILREC_EXT_DIR": str(tmp_path), "PATH": str(tmp_path / "nothing")}
    r = subprocess.run([sys.executable, "-m", "trainer.optim.build_ext", "--require"], env=env,
                       capture_output=True, text=True, cwd=kernel.CSRC.parents[3])
    assert r.returncode == 1 and "compiling the tailrec C++ kernel" in r.stderr and "NOT built" in r.stderr
    r = subprocess.run([sys.executable, "-m", "trainer.optim.build_ext"], env=env, capture_output=True,
                       text=True, cwd=kernel.CSRC.parents[3])
    assert r.returncode == 0, r.stderr   # make setup goes on: the pure-torch path still works

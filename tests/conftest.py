import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
sys.path.insert(0, ROOT)


def run(script, *args, stdin=None, timeout=300, env=None):
    """Run one of the project's scripts as a user would, from the repository root."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def train(out, *args, **kw):
    r = run("TRAIN.py", "--config", TINY, "--out", out, *args, **kw)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained once for the whole session: OUT/ and OUT/ckpt-step-3, OUT/ckpt-step-6."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train(out)
    return out

"""What `llmarch run` imports: a run on the CPU imports torch but none of the heavy modules it has no
use for. torch._dynamo and sympy (~130 MiB of RSS and seconds of start-up on 2 cores) come in
through torch's Python reference ops, which any module initializer or factory call on the meta
device can reach; transformers is a test oracle only; jinja2 is for --chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
# rich draws the loading bar, on a terminal only; huggingface_hub is for repo ids
UNWANTED = ["torch._dynamo", "torch._inductor", "sympy", "transformers", "jinja2", "rich", "huggingface_hub"]

SCRIPT = r"""
import json, sys
sys.argv = ["llmarch", "run", *sys.argv[1:]]
import llmarch.cli
try:
    llmarch.cli.main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(sys.modules)))
"""


def test_run_imports_none_of_the_heavy_modules(tiny):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [str(tiny("gemma3_text")), "--prompt-ids", "1,2,3", "-n", "2", "--device", "cpu", "--json"]
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(json.loads(lines[0])["tokens"]) == 2  # the run's own --json document, then the module list
    modules = set(json.loads(lines[-1]))
    assert "torch" in modules
    assert [m for m in UNWANTED if m in modules] == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_process_age_counts_from_llmarch_not_from_a_shell_that_exec_d_it():
    """bash runs the last command of `sleep 4 && python ...` in the process it forked before the
    sleep (exec without a new fork), so /proc's start time is the fork, 4 s before Python began;
    the run's "first token after start" must count from this program, not from that fork."""
    code = "from llmarch.runtime.run import _process_age_s; print(_process_age_s())"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        ["bash", "-c", f"sleep 4 && {sys.executable} -c '{code}'"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert 0 < float(r.stdout) < 3.0

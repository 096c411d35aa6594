"""
bench.py runs end to end on the tiny preset and prints every figure with its unit. Nothing
here looks at how fast anything is: speed is for reading, not for asserting.

    python -m pytest -q tests/test_bench.py
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NUM = r"(\d+(?:\.\d+)?)"


@pytest.fixture(scope="module")
def lines():
    # a fresh interpreter, as a user runs it; one thread keeps it quick on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench.py", "--preset", "tiny"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


def one(lines, prefix):
    found = [l for l in lines if l.startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


def test_config_line(lines):
    line = one(lines, "config: tiny preset model 2x32")
    assert "medians of" in line and "episodes from" in line


@pytest.mark.parametrize("n", [4, 8])
def test_fspo_lines(lines, n):
    speed = one(lines, f"fspo step N={n} B=4 tiny preset, cpu fp32")
    m = re.search(rf"shared {NUM} tok/s \(completion {NUM} tok/s\), naive {NUM} tok/s -> "
                  rf"{NUM}x faster", speed)
    assert m and all(float(x) > 0 for x in m.groups()), speed
    shared, naive, ratio = float(m[1]), float(m[3]), float(m[4])
    assert ratio == pytest.approx(shared / naive, rel=0.02)  # same tokens counted for both
    mem = one(lines, f"fspo memory N={n} B=4 tiny preset, cpu fp32")
    m = re.search(rf"shared {NUM} MB vs naive {NUM} MB -> {NUM}x", mem)
    assert m and float(m[2]) > 0, mem


def test_generate_line(lines):
    line = one(lines, "generate B=16 prompt")
    m = re.search(rf"KV cache {NUM} tok/s, recompute prefix {NUM} tok/s -> {NUM}x faster", line)
    assert m and all(float(x) > 0 for x in m.groups()), line
    # fp32 greedy decoding with and without the cache must agree token for token
    assert re.search(r"same \d+ greedy tokens \(fp32\) in 16/16 rows", line), line


@pytest.mark.parametrize("n", [4, 8])
def test_data_line(lines, n):
    line = one(lines, f"data N={n} B=4")
    m = re.search(rf"builds {NUM} episodes/s .* consumes {NUM} episodes/s -> loader {NUM}x "
                  rf"faster; .* adds {NUM}% to a step", line)
    assert m and float(m[1]) > 0 and float(m[2]) > 0, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="bench.py runs on the GPU here")
def test_cuda_lines_say_skipped_on_cpu(lines):
    assert one(lines, "mfu:").startswith("mfu: skipped")
    sdpa = one(lines, "sdpa kernel:")
    assert sdpa.startswith("sdpa kernel: skipped") and "flash_attention_for_cpu" in sdpa
    assert not any(re.search(r"\b0(\.0+)?%", l) for l in lines if l.startswith("mfu"))

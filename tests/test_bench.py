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


def run_bench(*flags):
    # a fresh interpreter, as a user runs it; one thread keeps it quick on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", *flags], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def lines():
    return run_bench("--device", "cpu")


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
    # only that the check ran: exactness is test_model.py's job, and a near-tie of a random
    # model's logits could flip a token on other hardware
    assert re.search(r"same \d+ greedy tokens \(fp32\) in \d+/16 rows", line), line


@pytest.mark.parametrize("n", [4, 8])
def test_data_line(lines, n):
    line = one(lines, f"data N={n} B=4")
    m = re.search(rf"builds {NUM} episodes/s .* consumes {NUM} episodes/s -> loader {NUM}x "
                  rf"faster; .* adds {NUM}% to a step", line)
    assert m and float(m[1]) > 0 and float(m[2]) > 0, line


def test_cuda_lines_say_skipped_on_cpu(lines):
    assert one(lines, "mfu").startswith("mfu: skipped (no CUDA")
    sdpa = one(lines, "sdpa kernel")
    assert sdpa.startswith("sdpa kernel: skipped (no CUDA)") and "flash_attention_for_cpu" in sdpa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lines():
    lines = run_bench("--device", "cuda", "--peak-tflops", "100")
    sdpa = one(lines, "sdpa kernel N=8")
    assert re.search(r"naive \(causal, no mask\) runs \w+ \[usable alone: [\w,]+\]; "
                     r"shared \(bool mask\) runs \w+", sdpa), sdpa
    mfu = one(lines, "mfu fspo step N=8")
    m = re.search(rf"eager {NUM}% \({NUM} TFLOP/s\)", mfu)
    assert m and float(m[1]) > 0 and "compiled: skipped (pass --compile)" in mfu, mfu
    assert re.search(r"memory N=8 .* shared \d+ MB vs naive \d+ MB", "\n".join(lines))

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
    return run_bench("--device", "cpu", "--no-compile")


def quotient_ok(q, a, b):
    """Does the printed quotient q agree with the printed a / b, given that each was rounded
    to its last printed digit? (Tiny-preset steps take a few ms: rounding alone moves a / b.)"""
    half = lambda s: 0.5 * 10 ** -(len(s.split(".")[1]) if "." in s else 0)
    x, y = float(a), float(b)
    lo, hi = (x - half(a)) / (y + half(b)), (x + half(a)) / max(y - half(b), 1e-12)
    return lo - half(q) <= float(q) <= hi + half(q)


def one(lines, prefix):
    found = [l for l in lines if l.startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


def test_config_and_peak_lines(lines):
    line = one(lines, "config: tiny preset model 2x32")
    assert "medians of" in line and "episodes from" in line
    m = re.search(rf"fp32 {NUM} GFLOP/s, bf16 {NUM} GFLOP/s -> bf16 {NUM}x fp32; amp_dtype auto = "
                  r"(float32|bfloat16)", one(lines, "peak matmul 1024x1024 cpu"))
    assert m and float(m[1]) > 0 and float(m[2]) > 0
    assert quotient_ok(m[3], m[2], m[1])
    # auto picks bf16 exactly when bf16 measured faster (the probe and this line time the
    # same thing; a near-tie could go either way, so only a clear gap is checked)
    if float(m[3]) < 0.5:
        assert m[4] == "float32"


def test_fspo_step_and_speedup_lines(lines):
    ms = {}
    # "new auto" is timed only where auto picks bf16 (model.amp_dtype): a CPU with native bf16
    auto = re.search(r"amp_dtype auto = (\w+)", one(lines, "peak matmul"))[1] == "bfloat16"
    for k in ("old fp32", "new fp32") + (("new auto",) if auto else ()):
        line = one(lines, f"fspo step N=8 B=4 tiny preset, cpu, {k}:")
        m = re.search(rf"{NUM} ms, {NUM} GFLOP/s = {NUM}% of the (fp32|bf16) peak \(rows x len: old "
                      rf"4x(\d+), mask 4x\5x\5; new 4x(\d+), tail mask 4x(\d+)x\6\)", line)
        assert m and float(m[2]) > 0, line
        assert m[4] == ("bf16" if k == "new auto" else "fp32"), line
        assert int(m[7]) < int(m[6])  # the mask covers the rejected tail only
        ms[k] = float(m[1])
    assert len([l for l in lines if l.startswith("fspo step N=8 B=4")]) == len(ms)
    assert one(lines, "compile fspo step N=8").endswith("skipped (pass --compile)")
    m = re.search(rf"\((new fp32|new auto)\) vs the previous layout's fp32 eager step: {NUM} ms -> "
                  rf"{NUM} ms -> {NUM}x$", one(lines, "speedup N=8 B=4 tiny preset, cpu:"))
    assert m and m[1] == ("new auto" if auto else "new fp32"), lines
    assert (float(m[2]), float(m[3])) == (ms["old fp32"], ms[m[1]])
    assert quotient_ok(m[4], m[2], m[3])
    m = re.search(rf"fp32 {NUM} ms, bf16 {NUM} ms -> bf16/fp32 step time {NUM}x",
                  one(lines, "bf16 fspo step N=8 B=4 tiny preset" if auto else  # emulated: fewer rows
                      "bf16 fspo step N=8 B=2 tiny preset"))
    assert m and quotient_ok(m[3], m[2], m[1])
    m = re.search(rf"new layout {NUM} MB vs old {NUM} MB", one(lines, "fspo memory N=8 B=4"))
    assert m and float(m[2]) > 0


def test_logps_line(lines):
    # the two layouts compute the same sums (float32 rounding); bf16 autocast lands near them
    m = re.search(rf"old vs new layout max \|diff\| ([\d.e+-]+) nats; bf16 autocast vs fp32 max "
                  rf"\|diff\| {NUM} nats \(mean \|sum\| {NUM}, 8 sums\)", one(lines, "logps B=4"))
    assert m, lines
    assert float(m[1]) < 1e-3 and float(m[2]) < 0.01 * float(m[3])


def test_generate_lines(lines):
    line = one(lines, "generate B=16 prompt")
    m = re.search(rf"KV cache {NUM} tok/s \({NUM} GFLOP/s = {NUM}% of the fp32 peak\), recompute "
                  rf"prefix {NUM} tok/s -> {NUM}x faster .*same 32 greedy tokens in (\d+)/16 rows",
                  line)
    assert m and float(m[1]) > 0 and float(m[4]) > 0, line
    # both in float32, cached and recomputed differ by rounding only: a flipped greedy token
    # needs a near-tie of two logits to ~1e-6, allowed in at most 2 rows
    assert int(m[6]) >= 14, line
    line = one(lines, "generate bf16 B=16 prompt")
    # G new tokens: bench.py's gen_tokens where bf16 is native, fewer where it is emulated
    m = re.search(rf"prompt 48 \+ (\d+) new tok, KV cache, .*: fp32 {NUM} tok/s, bf16 {NUM} tok/s "
                  rf"\({NUM} GFLOP/s = {NUM}% of the bf16 peak\) -> bf16 {NUM}x fp32; same \1 "
                  rf"greedy tokens in (\d+)/16 rows", line)
    assert m and float(m[3]) > 0, line
    assert int(m[7]) >= 1  # bf16 may flip near-ties, not every row of a 2-layer model


def test_data_line(lines):
    m = re.search(rf"pack_batch \+ to cpu {NUM} ms per batch .* = {NUM}% of a step",
                  one(lines, "data N=8 B=4"))
    assert m and float(m[1]) > 0


@pytest.mark.parametrize("method", ["sft", "fspo"])
def test_group_line(lines, method):
    m = re.search(rf"16 steps as drawn {NUM} s \((\d+) tokens, (\d+)% padding\), grouped by length "
                  rf"{NUM} s \((\d+) tokens, (\d+)% padding\) -> {NUM}x", one(lines, f"group {method} N=8 B=4 K=16"))
    assert m and quotient_ok(m[7], m[1], m[4])
    assert int(m[5]) < int(m[2]) and int(m[6]) < int(m[3])  # the same episodes in fewer padded tokens


def test_batch_line(lines):
    """The same 8 episodes as two steps of 4 and one of 8; the figure is their quotient."""
    m = re.search(rf"8 episodes as 2 steps of 4 {NUM} ms, as 1 step of 8 {NUM} ms -> {NUM}x the "
                  rf"episodes per second", one(lines, "batch fspo step N=1"))
    assert m and quotient_ok(m[3], m[1], m[2])


def test_only_batch_runs_that_figure_alone():
    out = run_bench("--device", "cpu", "--only", "batch")
    assert [l.split(" ")[0] for l in out] == ["config:", "batch"], out


def test_cuda_lines_say_skipped_on_cpu(lines):
    assert one(lines, "mfu").startswith("mfu: skipped (no CUDA")
    sdpa = one(lines, "sdpa kernel N=8")
    assert sdpa.count("flash_attention_for_cpu") == 2, sdpa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lines():
    lines = run_bench("--device", "cuda", "--peak-tflops", "100", "--no-compile")
    assert re.search(r"old layout \(full mask\) runs \w+; new layout \(causal head \+ masked "
                     r"tail\) runs [\w+]+", one(lines, "sdpa kernel N=8")), lines
    mfu = one(lines, "mfu fspo step N=8")
    m = re.search(rf"eager {NUM}% \({NUM} TFLOP/s\)", mfu)
    assert m and float(m[1]) > 0 and "compiled: skipped (pass --compile)" in mfu, mfu


def test_the_jobs_figure_times_two_processes_against_one(capsys):
    """bench_jobs on the tiny model with two threads: both runs finish and the printed ratio is
    the printed rates' quotient (on one thread, or off CPU, it says it skipped)."""
    import argparse
    import bench
    m = argparse.Namespace(dev="cpu", cfg=bench.GPTConfig(block_size=64, vocab_size=64, n_layer=1,
                                                            n_head=1, n_embd=16))
    b = bench.data.pack_batch([bench.data.Episode([1, 2, 3, 4], [5, 6, 0], [7, 8, 9, 0])] * 2, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bench.bench_jobs(m, b, 2, steps=2)
    finally:
        torch.set_num_threads(threads)
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(rf"jobs fspo step N=2 \(2 steps a process\): 1 process x 2 threads {NUM} steps/s, "
                     rf"2 processes x 1 {NUM} steps/s -> {NUM}x the steps per second", line)
    assert m, line
    assert quotient_ok(m[3], m[2], m[1])

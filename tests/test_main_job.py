"""The main job end to end on the tiny preset, and its plan (the methods of each domain and N,
the stages and their order, --jobs): python -m pytest -q tests/test_main_job.py"""
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import eval as evaluation
import fspo
import judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_main_job_writes_a_report_whose_numbers_parse(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "fspo.py", "--preset", "tiny", "--sft-shots", "3", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    (res,) = metrics
    methods = {"base", "prompted", "fspo", "pooled"}
    assert res["domain"] == "roleplay" and res["shots"] == 2
    assert res["trained_shots"] == {"sft": 3, "fspo": 2, "pooled": 2}
    test_users = {json.loads(l)["user_id"] for l in open(out / "data" / "roleplay" / "prefs.jsonl")
                  if json.loads(l)["split"] == "test"}
    assert set(res["win_rate"]) == set(res["well_formed"]) == methods
    for m in methods:  # eval_users 4 x eval_questions 2, from test users only
        wr = res["win_rate"][m]["all"]
        assert 0 <= wr["lo"] <= wr["rate"] <= wr["hi"] <= 1 and wr["n"] == 2 * min(4, len(test_users))
    assert all(0 <= v <= 1 for v in res["well_formed"].values()) and "well-formed answers" in report
    for m in ("fspo", "pooled"):
        accs = res["pair_accuracy"][m]
        assert sorted(int(k) for k in accs) == [0, 1, 2, 4, 8]
        assert all(0 <= a["lo"] <= a["rate"] <= a["hi"] <= 1 and a["n"] > 0 for a in accs.values())
    # metrics.json read back formats to the report's tables, character for character
    assert evaluation.format_tables(evaluation.load_results(out / "metrics.json")) in report
    # every table row of the report carries numbers that parse and match metrics.json
    rows = [l for l in report.splitlines() if l.startswith("| FSPO (IPO)")]
    assert len(rows) == 3 and rows[0].startswith("| FSPO (IPO) | 2 | ")  # win rate, curve, left-out family
    assert any(l.startswith("| IPO, no user context (pooled) | 0 | ") for l in report.splitlines())
    cells = [float(x) for x in re.findall(r"\d+\.\d+", rows[0])]
    assert cells[0] == round(100 * res["win_rate"]["fspo"]["all"]["rate"], 1)
    assert cells[1:3] == [round(100 * res["win_rate"]["fspo"]["all"][k], 1) for k in ("lo", "hi")]
    # eval.py on its own takes N from the stage-2 checkpoint (2), not from SFT's 0-3 range
    base = out / "roleplay-2shot"
    r = subprocess.run([sys.executable, "eval.py", "--base", str(base / "sft"), "--ckpt", str(base / "fspo"),
                        "--data", str(out / "data"), "--eval-users", "2", "--batch-size", "4", "--out", str(tmp_path / "ev")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (test,) = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert test["shots"] == 2
    # --split val: the same report on val users, each curve figure over all their episodes
    r = subprocess.run([sys.executable, "eval.py", "--base", str(base / "sft"), "--ckpt", str(base / "fspo"),
                        "--data", str(out / "data"), "--eval-users", "2", "--batch-size", "4", "--split", "val",
                        "--out", str(tmp_path / "val")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (val,) = json.loads((tmp_path / "val" / "metrics.json").read_text())
    report = (tmp_path / "val" / "report.md").read_text()
    assert val["split"] == "val" and "on VAL users" in report and "pairs of val users" in report
    rows_of = {}
    for line in open(out / "data" / "roleplay" / "prefs.jsonl"):
        row = json.loads(line)
        rows_of.setdefault(row["split"], {}).setdefault(row["user_id"], []).append(row)
    for split, res_ in (("val", val), ("test", test)):
        per_user = [len(v) for v in rows_of[split].values()]
        k = next(k for k in (8, 4, 2, 1) if sum(-(-n // (k + 1)) for n in per_user if n > k) >= 4)
        episodes = sum(-(-n // (k + 1)) for n in per_user if n > k)
        assert res_["pair_accuracy"]["fspo"]["0"]["n"] == episodes // 4 * 4, (split, k)
        assert res_["win_rate"]["fspo"]["all"]["n"] == 2 * min(2, len(per_user))
    # stages are cached: a second run skips training and evaluates again
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("[skip]") == 3, r.stdout
    # a cached stage or dataset made with other settings is refused with the path and the
    # setting named, never reused under the new flags
    r = subprocess.run(cmd + ["--pref-steps", "21"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "roleplay-2shot/fspo" in r.stderr and "steps: 20 there, 21 now" in r.stderr
    r = subprocess.run(cmd + ["--synth", "--writers 2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "stats.json" in r.stderr and "writers: 3 there, 2 now" in r.stderr


def test_your_own_users_file_trains_evaluates_and_personalizes(tmp_path):
    """tests/data/byo.jsonl has only user_id, prompt, chosen, rejected (40 users x 12 rows):
    the main job splits it by user, reports pair accuracy with intervals and a picture, says
    why there is no win rate; eval.py --personalize answers for a new person's pairs."""
    out = tmp_path / "byo"
    cmd = [sys.executable, "fspo.py", "--preset", "tiny", "--prefs", "tests/data/byo.jsonl", "--out",
           str(out), "--sft-steps", "10", "--pref-steps", "6", "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    splits = json.loads((out / "splits.json").read_text())
    assert sum(s["users"] for s in splits.values()) == 40 and sum(s["rows"] for s in splits.values()) == 480
    assert all(splits[s]["users"] > 0 for s in ("train", "val", "test"))
    (res,) = json.loads((out / "metrics.json").read_text())
    assert res["domain"] == "byo" and res["win_rate"] == {} and "no win rate" in res["no_win_rate"]
    report = (out / "report.md").read_text()
    assert "| FSPO (IPO) | " in report and "![byo: pair accuracy vs shots](curve-byo-2shot.svg)" in report
    svg = ET.parse(out / "curve-byo-2shot.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and all(len(l.get("points").split()) == 5 for l in lines)  # 0..8 shots
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "byo-2shot" / "fspo"), "--personalize",
                        "tests/data/me.jsonl", "--question", "How can I enjoy chess more?",
                        "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Q: How can I enjoy chess more?") == 2
    assert "[FSPO (IPO), reading 4 pairs]" in r.stdout and "[base (SFT, no context)]" in r.stdout


@pytest.mark.parametrize("jobs", [1, 2])
def test_annotated_main_job_warm_starts_fspo_from_oracle(tmp_path, jobs):
    """--annotate --fspo-init oracle (the annotated preset's recipe) on the tiny preset: oracle
    trains before FSPO whatever the order of --methods, FSPO starts from it with the SFT as its
    reference, only the stages whose prompt holds shots are annotated, and the report says the
    base wrote the annotations. With --jobs 2 pooled trains beside the oracle, in a process of
    its own."""
    out = tmp_path / "ann"
    cmd = [sys.executable, "fspo.py", "--preset", "tiny", "--annotate", "--fspo-init", "oracle",
           "--methods", "fspo,pooled,oracle", "--stage-steps", "oracle:7,pooled:9", "--oracle-lr", "2e-3",
           "--out", str(out), "--no-progress", "--jobs", str(jobs)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    base = out / "roleplay-2shot"
    args = {m: json.loads((base / m / "ckpt" / "config.json").read_text())["args"]
            for m in ("sft", "oracle", "fspo", "pooled")}
    assert [(args[m]["init"], args[m]["ref"], args[m]["annotate"]) for m in args] == [
        (None, None, True), (str(base / "sft"), None, None),
        (str(base / "oracle"), str(base / "sft"), True), (str(base / "sft"), None, None)]
    assert (args["oracle"]["steps"], args["fspo"]["steps"], args["pooled"]["steps"]) == (7, 20, 9)
    assert (args["oracle"]["lr"], args["fspo"]["lr"], args["pooled"]["lr"]) == (2e-3, 1e-3, 1e-3)  # tiny's pref_lr
    if jobs == 1:
        assert r.stdout.index("[oracle]") < r.stdout.index("[fspo]") < r.stdout.index("[pooled]")
    else:
        assert r.stdout.index("[start] pooled") < r.stdout.index("[oracle]") < r.stdout.index("[start] fspo")
    (res,) = json.loads((out / "metrics.json").read_text())
    assert res["annotated"] == ["fspo", "prompted"]
    report = (out / "report.md").read_text()
    assert "| FSPO (IPO), annotated shots | 2 | " in report
    # FSPO is also scored with the judge's lines, training's, at every shot count but 0 (no lines)
    judged = res["pair_accuracy"]["fspo-judge"]
    assert sorted(int(k) for k in judged) == [0, 1, 2, 4, 8] and judged["0"] == res["pair_accuracy"]["fspo"]["0"]
    assert report.count("| FSPO (IPO), the judge's annotations in place of the base's | ") == 2  # + left-out
    tally = res["pair_accuracy"]["tally"]  # the judge's tally by rule: no shots, no tally, a tie
    assert sorted(int(k) for k in tally) == [0, 1, 2, 4, 8] and tally["0"]["rate"] == 0.5
    assert report.count("| the judge's tally applied by rule (no model) | ") == 2


def test_tally_only_main_job_trains_fspo_on_the_tally_and_lets_it_read_the_shots(tmp_path):
    """--annotate tally on the tiny preset: the SFT learns no lines, FSPO reads the counted tally
    alone, counted at evaluation from its own reading of each shot (eval.Reader), and the report
    names it so, with the judge's counts and the counted rule as rows (no shots: no tally, a tie)."""
    out = tmp_path / "tal"
    cmd = [sys.executable, "fspo.py", "--preset", "tiny", "--annotate", "tally", "--methods", "fspo",
           "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    base = out / "roleplay-2shot"
    args = {m: json.loads((base / m / "ckpt" / "config.json").read_text())["args"] for m in ("sft", "fspo")}
    assert (args["sft"]["annotate"], args["fspo"]["annotate"]) == (None, "tally")
    (res,) = json.loads((out / "metrics.json").read_text())
    assert (res["annotated"], res["tally_only"], res["self_read"]) == (["fspo"], ["fspo"], ["fspo"])
    report = (out / "report.md").read_text()
    assert "| FSPO (IPO), the shots' tally | 2 | " in report and "`fspo.py --annotate tally`" in report
    assert res["pair_accuracy"]["tally"]["0"]["rate"] == 0.5 and "fspo-judge" in res["pair_accuracy"]
    # the gap closed, from 1 shot on: the curve's rates, and the report's cells with their intervals
    acc, gaps = res["pair_accuracy"], res["pair_accuracy_gap"]["fspo"]
    assert sorted(int(k) for k in gaps) == [1, 2, 4, 8]
    for k, g in gaps.items():
        ref = acc["reference"][k]["rate"]
        assert g["rate"] == (None if ref <= 0.5 else pytest.approx((acc["fspo"][k]["rate"] - 0.5) / (ref - 0.5)))
    row = next(l for l in report.splitlines() if l.startswith("| FSPO: gap to the reference closed"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")][1:]
    assert cells == ["-"] + [evaluation.gap_cell(gaps[k]) for k in ("1", "2", "4", "8")]
    # FSPO's readings against the judge's lines, per axis, over the curve's held-out shots
    la = res["line_agreement"]  # every shot's reading found in the reader's cache
    assert la["shots"] > 0 and la["written"] == la["shots"] and list(la["axes"]) == list(judge.JUDGES["roleplay"].axes)
    assert all(0 <= c["named"] + c["flipped"] <= c["differs"] <= la["shots"]
               and c["false"] <= la["shots"] - c["differs"] for c in la["axes"].values())
    assert "FSPO's readings of the shots against the judge's" in report and "read each shot itself" in report
    # without the users file there is no judge to count the lines with: refused, not read as shots
    alone = tmp_path / "own" / "prefs.jsonl"
    alone.parent.mkdir()
    alone.write_text((out / "data" / "roleplay" / "prefs.jsonl").read_text())
    r = subprocess.run([sys.executable, "eval.py", "--base", str(base / "sft"), "--ckpt", str(base / "fspo"),
                        "--prefs", str(alone), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--annotate tally" in r.stderr and "--users" in r.stderr, r.stderr[-2000:]


def test_methods_per_domain_and_the_oracle_each_fspo_domain_needs(tmp_path):
    """--methods as one list serves every domain; as 'domain:list' entries each domain gets its
    own, a 'domain-Nshot:list' entry that N's own, in training order (oracle first under
    --fspo-init oracle, cot-sft before cot); a domain without an entry, or one that trains fspo
    or cot-sft from an oracle it lacks, is refused before anything is written."""
    get = lambda m, *a: fspo.get_args(["--preset", "annotated", "--methods", m, *a])
    one = get("fspo,pooled,oracle")
    assert [fspo.stage_order(one, fspo.domain_methods(one, d)) for d in ("roleplay", "elix")] == \
        [["oracle", "fspo", "pooled"]] * 2
    per = get("roleplay:fspo-dpo,pooled,oracle elix:pref-ft,fspo,oracle reviews:pooled "
              "reviews-8shot:cot,cot-sft,oracle")
    assert [fspo.stage_order(per, fspo.domain_methods(per, d, n)) for d, n in
            [("roleplay", 8), ("elix", 4), ("reviews", 4), ("reviews", 8)]] == \
        [["oracle", "fspo-dpo", "pooled"], ["oracle", "pref-ft", "fspo"], ["pooled"], ["oracle", "cot-sft", "cot"]]
    for argv, says in [(["--methods", "roleplay:oracle,fspo", "--domains", "roleplay,elix"], "domain 'elix'"),
                       (["--methods", "roleplay:oracle,fspo elix:fspo", "--domains", "roleplay,elix"],
                        "needs oracle in --methods (domain elix, 8 shots)"),
                       (["--methods", "roleplay:oracle reviews:oracle reviews-8shot:cot-sft,cot",
                         "--domains", "roleplay,reviews"], "needs oracle in --methods (domain reviews, 8 shots)"),
                       (["--methods", "roleplay:oracle elix-4shot:fspo", "--domains", "roleplay,elix"],
                        "names elix-4shot, not a domain or domain-Nshot of this job"),
                       (["--methods", "roleplay:oracle,fspo pooled"], "'pooled' names no domain"),
                       (["--stage-steps", "oracle:20,fspo:x"], "'fspo:x' is not method:steps"),
                       (["--stage-steps", "pooled-dpo:5"], "'pooled-dpo:5' is not method:steps"),
                       (["--stage-steps", "fspo:0"], "'fspo:0' is not method:steps, steps >= 1"),
                       (["--methods", "roleplay:oracle reveiws-8shot:fspo"], "names reveiws-8shot, not a domain"),
                       (["--methods", "roleplay:oracle,cot"], "cot starts from cot-sft")]:
        with pytest.raises(SystemExit, match=re.escape(says)):
            fspo.main(["--preset", "annotated", "--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()


def test_stages_that_learn_the_same_at_every_n_train_once_per_domain(tmp_path, monkeypatch):
    """Reviews has two N (4, 8): the SFT under --sft-shots and the methods without shots in
    their prompt (oracle, pooled) train at N = 4 and serve N = 8; those that read shots train
    at each N, FSPO at 8 starting from the oracle of 4. Without --sft-shots the SFT trains at
    each N, and every stage after it."""
    calls, runs = [], {}
    monkeypatch.setattr(fspo, "run_stage", lambda args, tok, tp, name, out, *a, init=None, ref=None, **kw:
                        calls.append((name, os.path.relpath(out, tmp_path), init and os.path.relpath(init, tmp_path))))
    monkeypatch.setattr(fspo.evaluation, "evaluate_runs", lambda r, *a: runs.update(r) or "")
    monkeypatch.setattr(fspo, "ensure_data", lambda *a: None)
    monkeypatch.setattr(fspo.data, "ensure_tokenizer", lambda *a: None)
    argv = ["--preset", "paper", "--domains", "reviews", "--methods", "oracle,fspo,pooled", "--out", str(tmp_path),
            "--jobs", "1"]
    fspo.main(argv)
    assert calls == [("sft", "reviews-4shot/sft", None), ("oracle", "reviews-4shot/oracle", "reviews-4shot/sft"),
                     ("fspo", "reviews-4shot/fspo", "reviews-4shot/oracle"), ("pooled", "reviews-4shot/pooled", "reviews-4shot/sft"),
                     ("fspo", "reviews-8shot/fspo", "reviews-4shot/oracle")]
    eight = {m: os.path.relpath(p, tmp_path) for m, p in runs[("reviews", 8)][0].items()}
    assert eight == {"sft": "reviews-4shot/sft", "oracle": "reviews-4shot/oracle", "pooled": "reviews-4shot/pooled",
                     "fspo": "reviews-8shot/fspo"}
    calls.clear()
    fspo.main(argv + ["--sft-shots", "0"])  # 0 = unset: the SFT sees 0..N shots, so it differs per N,
    assert [c[:2] for c in calls if c[0] == "sft"] == [("sft", "reviews-4shot/sft"), ("sft", "reviews-8shot/sft")]
    # and so do the stages that start from it
    assert [c for c in calls if "8shot" in c[1]] == [
        ("sft", "reviews-8shot/sft", None), ("oracle", "reviews-8shot/oracle", "reviews-8shot/sft"),
        ("fspo", "reviews-8shot/fspo", "reviews-8shot/oracle"), ("pooled", "reviews-8shot/pooled", "reviews-8shot/sft")]
    # a stage trained once at N = 4 serves N = 8 only where N = 8's list names it
    runs.clear()
    fspo.main(argv[:5] + ["reviews-4shot:oracle,fspo,pooled reviews-8shot:oracle,fspo"] + argv[6:])
    assert sorted(runs[("reviews", 8)][0]) == ["fspo", "oracle", "sft"]


def test_the_paper_presets_chain_trains_each_stage_once_from_its_init_for_its_steps(tmp_path, monkeypatch):
    """The paper preset's stages as written out by hand: per domain and N its own methods
    (Reviews' cot at 8 shots only), FSPO (IPO and DPO), Pref-FT and cot-sft from the oracle, FSPO with
    the SFT as its reference, cot from cot-sft, and each stage's steps (--stage-steps over the
    preset's; fspo-dpo takes fspo's count)."""
    calls = []
    rel = lambda p: p and os.path.relpath(p, tmp_path)
    monkeypatch.setattr(fspo, "run_stage", lambda args, tok, tp, name, out, *a, init=None, ref=None, steps=None, **kw:
                        calls.append((rel(out), rel(init), rel(ref), steps)))
    monkeypatch.setattr(fspo.evaluation, "evaluate_runs", lambda *a: "")
    monkeypatch.setattr(fspo, "ensure_data", lambda *a: None)
    monkeypatch.setattr(fspo.data, "ensure_tokenizer", lambda *a: None)
    fspo.main(["--preset", "paper", "--out", str(tmp_path), "--stage-steps", "pooled:900", "--jobs", "1"])
    r, e, v4, v8 = "roleplay-8shot/", "elix-4shot/", "reviews-4shot/", "reviews-8shot/"
    assert calls == [
        (r + "sft", None, None, 750), (r + "oracle", r + "sft", None, 2000),
        (r + "fspo", r + "oracle", r + "sft", 2500), (r + "fspo-dpo", r + "oracle", r + "sft", 2500),
        (r + "pref-ft", r + "oracle", None, 500), (r + "pooled", r + "sft", None, 900),
        (r + "cot-sft", r + "oracle", None, 750), (r + "cot", r + "cot-sft", None, 2500),
        (e + "sft", None, None, 750), (e + "oracle", e + "sft", None, 2000),
        (e + "fspo", e + "oracle", e + "sft", 2500), (e + "pref-ft", e + "oracle", None, 500),
        (v4 + "sft", None, None, 750), (v4 + "oracle", v4 + "sft", None, 2000),
        (v4 + "fspo", v4 + "oracle", v4 + "sft", 2500), (v4 + "pref-ft", v4 + "oracle", None, 500),
        (v8 + "fspo", v4 + "oracle", v4 + "sft", 2500), (v8 + "pref-ft", v4 + "oracle", None, 500),
        (v8 + "cot-sft", v4 + "oracle", None, 750), (v8 + "cot", v8 + "cot-sft", None, 2500)]


def test_bpe_dropout_reaches_the_stages_of_the_domains_it_names(tmp_path, monkeypatch):
    """--bpe-dropout per domain: the paper preset's 'elix:0.03' reaches every ELIX stage and no
    other (None there, so their recipes and caches are those of a run without the flag); one
    number reaches every stage; a lone stage takes its --domain's; nonsense is refused."""
    got = {}
    monkeypatch.setattr(fspo, "run_stage", lambda args, tok, tp, name, out, *a, bpe_dropout=None, **kw:
                        got.__setitem__(os.path.relpath(out, tmp_path), bpe_dropout))
    monkeypatch.setattr(fspo.evaluation, "evaluate_runs", lambda *a: "")
    monkeypatch.setattr(fspo, "ensure_data", lambda *a: None)
    monkeypatch.setattr(fspo.data, "ensure_tokenizer", lambda *a: None)
    fspo.main(["--preset", "paper", "--out", str(tmp_path), "--jobs", "1"])
    assert len(got) == 20 and {k: v for k, v in got.items() if v is not None} == \
        {f"elix-4shot/{m}": 0.03 for m in ("sft", "oracle", "fspo", "pref-ft")}
    got.clear()
    fspo.main(["--preset", "paper", "--out", str(tmp_path), "--jobs", "1", "--bpe-dropout", "0.1"])
    assert len(got) == 20 and set(got.values()) == {0.1}
    seen = []
    monkeypatch.setattr(fspo, "train", lambda a, *rest: seen.append(a.bpe_dropout) or {})
    monkeypatch.setattr(fspo.data, "ensure_tokenizer", lambda *a: fspo.data.Tokenizer({bytes([i]): i for i in range(256)}))
    for domain in ("elix", "reviews"):
        fspo.main(["--preset", "paper", "--method", "sft", "--domain", domain, "--out", str(tmp_path / domain)])
    assert seen == [0.03, None]
    for bad in ("elix:often", "1.5", "elx:0.03"):
        with pytest.raises(SystemExit, match="--bpe-dropout"):
            fspo.main(["--preset", "paper", "--out", str(tmp_path), "--jobs", "1", "--bpe-dropout", bad])


def record_stage(args, tok, tok_path, name, out, **kw):
    """A stand-in for run_stage that notes when it ran and on how many threads."""
    t0 = time.time()
    time.sleep(1.5)  # longer than one worker's start can lag the other's, even on a busy machine
    Path(out).write_text(json.dumps([t0, time.time(), torch.get_num_threads()]))


def test_jobs_start_the_stage_heading_the_longest_chain_of_steps_first(tmp_path):
    """Of the ready stages, the one with the most steps in it and in the stages that start from
    it (counted by hand) starts first, whatever the list's order; of equal chains, the one with
    the most steps of stages behind it."""
    p = lambda n: str(tmp_path / n)
    stages = [dict(name="pooled", out=p("a"), steps=3), dict(name="pref-ft", out=p("b"), steps=3),
              dict(name="sft", out=p("c"), steps=2), dict(name="oracle", out=p("d"), init=p("c"), steps=1),
              dict(name="fspo", out=p("e"), init=p("d"), ref=p("c"), steps=5)]
    assert fspo.chain_steps(stages) == {p("a"): (3, 3), p("b"): (3, 3), p("c"): (8, 8), p("d"): (6, 6), p("e"): (5, 5)}
    # of two chains of 4 steps, the one with 2 more steps beside it comes first
    two = [dict(out="x", steps=4), dict(out="y", steps=1), dict(out="y1", init="y", steps=3),
           dict(out="y2", init="y", steps=2)]
    assert fspo.chain_steps(two) == {"x": (4, 4), "y": (4, 6), "y1": (3, 3), "y2": (2, 2)}
    fspo.run_stages(Namespace(jobs=2, device="cpu", no_progress=False), None, None, stages, fn=record_stage)
    (a0, a1, _), (b0, _, _), (c0, c1, _) = [json.loads(Path(p(n)).read_text()) for n in "abc"]
    assert c0 < b0 and a0 < b0 and b0 >= min(a1, c1)  # c and a first; b waits for a free worker


def test_jobs_run_stages_side_by_side_each_after_the_stages_it_starts_from(tmp_path):
    """--jobs 2: a stage starts only once its init and ref are done, two independent ones run
    at once, each process on half the threads; a stage that needs a stage outside the list
    (an earlier run's) does not wait for it."""
    p = lambda n: str(tmp_path / n)
    stages = [dict(name="sft", out=p("a")), dict(name="oracle", out=p("b"), init=p("a")),
              dict(name="sft", out=p("c"), init=p("elsewhere")),
              dict(name="fspo", out=p("d"), init=p("elsewhere"), ref=p("b"))]
    args = Namespace(jobs=2, device="cpu", no_progress=False)
    fspo.run_stages(args, None, None, stages, fn=record_stage)
    (a0, a1, na), (b0, b1, _), (c0, c1, _), (d0, d1, _) = \
        [json.loads(Path(p(n)).read_text()) for n in "abcd"]
    assert b0 >= a1 and d0 >= b1  # after their init, and d after its ref
    assert c0 < a1 and a0 < c1  # a and c side by side
    assert na == max(1, torch.get_num_threads() // 2)


def test_data_from_older_generator_code_is_refused(tmp_path, monkeypatch):
    """ensure_data reuses a domain only if the generator, run again with the same flags, writes
    the same bytes: a change to the judge's code (here its quality weight) relabels the pairs with
    no setting changed, and the old data is refused with its path, not trained on."""
    args = Namespace(scale="tiny", seed=3, synth="--workers 1")
    data_dir = str(tmp_path / "data")
    fspo.ensure_data(args, data_dir, ["roleplay"])
    before = (tmp_path / "data" / "roleplay" / "prefs.jsonl").read_bytes()
    fspo.ensure_data(args, data_dir, ["roleplay"])  # the same code: reused as it is
    monkeypatch.setattr(judge, "W_REL", judge.W_REL * 3)
    with pytest.raises(SystemExit, match=r"roleplay/prefs\.jsonl: not what generate_synthetic\.py"):
        fspo.ensure_data(args, data_dir, ["roleplay"])
    assert (tmp_path / "data" / "roleplay" / "prefs.jsonl").read_bytes() == before  # left as it was

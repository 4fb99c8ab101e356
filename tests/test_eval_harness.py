"""RULER-style task generators, scorers, and the eval runner (resume, report) on a tiny model."""

import json

import pytest

from kvcascade.cli import main as cli_main
from kvcascade.errors import KVCascadeError
from kvcascade.eval import make_sample, score, string_match_all
from kvcascade.eval.runner import Grid, parse_length, read_rows, run_grid
from kvcascade.eval.tasks import RULER, TASKS, string_match_part

from .conftest import make_tiny_tokenizer

PROSE = ("In the beginning the river ran north, and the hills were green; the people built their houses by the water. "
         "They planted barley and figs: the harvest was good, and the elders counted the sheaves. ") * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                "niah_single:haystack=prose:value=uuid"]


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("length,depth", [(2048, 0.0), (3000, 0.25), (4096, 0.5), (6000, 0.9), (8192, 1.0)])
def test_needle_at_requested_length_and_depth(tok, task, length, depth):
    s = make_sample(task, tok, length, depth, seed=7, prose=PROSE)
    assert abs(s.tokens - length) <= 0.01 * length
    start, end = s.meta.get("haystack_start"), s.meta.get("haystack_end")
    if start is None:  # passkey keeps its meta in the same place
        start, end = s.meta["haystack_start"], s.meta["haystack_end"]
    expected = start + depth * (end - start)
    assert abs(s.needle_token - expected) <= 0.01 * length, (s.needle_token, expected)
    assert all(a in s.prompt for a in s.answers)
    assert make_sample(task, tok, length, depth, seed=7, prose=PROSE).prompt == s.prompt  # deterministic
    assert make_sample(task, tok, length, depth, seed=8, prose=PROSE).answers != s.answers  # seed matters


@pytest.mark.parametrize("task", ["vt", "cwe", "fwe"])
@pytest.mark.parametrize("length", [1024, 4096, 16384])
def test_other_tasks_length_and_answers(tok, task, length):
    s = make_sample(task, tok, length, seed=3)
    assert abs(s.tokens - length) <= 0.01 * length
    assert s.depth is None and s.answers
    body = s.prompt
    if task == "vt":
        assert len(s.answers) == 5 and all(f"VAR {v} =" in body for v in s.answers)
    if task == "cwe":  # each common word appears more often than any other word
        items = [w for w in body.split() if w.isalpha() and w.islower() and len(w) == 6]
        from collections import Counter

        c = Counter(items)
        least_common = min(c[a] for a in s.answers)
        others = max(v for w, v in c.items() if w not in s.answers)
        assert least_common > others
    if task == "fwe":
        from collections import Counter

        words = [w for w in body.split() if len(w) == 5 and w.isalpha() and w.islower()]
        top = [w for w, _ in Counter(words).most_common(len(s.answers))]
        assert set(top) == set(s.answers)
    assert make_sample(task, tok, length, seed=3).prompt == s.prompt


def test_multi_needle_tasks_have_distractors_and_all_answers(tok):
    mk = make_sample("niah_multikey", tok, 4096, 0.5, seed=1, prose=PROSE)
    assert len(mk.answers) == 1 and mk.prompt.count("One of the special magic numbers for") == 4
    mv = make_sample("niah_multivalue", tok, 4096, 0.5, seed=1, prose=PROSE)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    mq = make_sample("niah_multiquery", tok, 4096, 0.5, seed=1, prose=PROSE)
    assert len(mq.answers) == 4 and mq.prompt.rstrip().endswith("are") and " and " in mq.prompt[-200:]
    u = make_sample("niah_single:value=uuid", tok, 2048, 0.5, seed=1)
    assert len(u.answers[0]) == 36 and u.answers[0].count("-") == 4


def test_ruler_scorers_on_crafted_answers():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("The number is 1234567.", ["1234567", "7654321"]) == 0.5
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive, as RULER
    assert string_match_part("it is 42", ["7", "42"]) == 1.0 and string_match_part("x", ["7"]) == 0.0
    assert score("first_number", " 12345 then 999", ["12345"]) == 1.0
    assert score("first_number", " 999 then 12345", ["12345"]) == 0.0


def test_bad_task_inputs(tok):
    with pytest.raises(KVCascadeError, match="unknown task"):
        make_sample("nope", tok, 1024)
    with pytest.raises(KVCascadeError, match="depth"):
        make_sample("passkey", tok, 1024, 1.5)
    with pytest.raises(KVCascadeError, match="haystack"):
        make_sample("niah_single:haystack=lava", tok, 1024)
    with pytest.raises(KVCascadeError, match="bad option"):
        make_sample("niah_single:colour=red", tok, 1024)
    with pytest.raises(KVCascadeError, match="too short"):
        make_sample("niah_multikey", tok, 60, 0.5, prose=PROSE)
    assert parse_length("4k") == 4096 and parse_length("1m") == 2**20 and parse_length("all") == 0
    with pytest.raises(KVCascadeError):
        parse_length("lots")
    assert set(RULER) < set(TASKS)


def _tiny(tiny_model_dir):
    import kvcascade

    return kvcascade.load_model(str(tiny_model_dir), device="cpu", progress=False)


def test_runner_resumes_and_reports(tiny_model_dir, tmp_path):
    model, tok = _tiny(tiny_model_dir)
    grid = Grid(tasks=["passkey", "vt", "ppl"], policies=["full", "streaming", "cascade:cascades=2"], budgets=[48],
                lengths=[128, 256], samples=2, chunk_size=32, ppl_bucket=64)
    out = tmp_path / "ev"
    rows = run_grid(model, tok, grid, out, model_name="tiny", ppl_text=PROSE, progress=False)
    # passkey, vt: 2 lengths x (full + 2 budgeted) x 2 samples; ppl: 2 lengths x 3
    assert len(rows) == 2 * 2 * 3 * 2 + 2 * 3
    assert all(0.0 <= r["score"] <= 1.0 for r in rows if r["task"] != "ppl")
    for r in rows:
        assert r["kv_bytes_peak"] > 0 and r["seconds"] > 0 and "peak_rss_bytes" in r
        if r["policy"] != "full" and r["task"] != "ppl":
            assert r["kv_tokens_peak"] <= 48 + 32
    # same prompts for every policy: same expected answers per (task, length, depth, sample)
    by = {}
    for r in rows:
        if r["task"] != "ppl":
            by.setdefault((r["task"], r["length"], r["depth"], r["sample"]), set()).add(tuple(r["answers"]))
    assert all(len(v) == 1 for v in by.values())
    files = sorted(p.name for p in out.iterdir())
    assert "summary.md" in files and "passkey_depth_heatmap_b48.png" in files and "ppl_vs_position.png" in files
    assert "ppl_vs_kv.png" in files  # perplexity against KV memory, a point per policy and budget
    summary = (out / "summary.md").read_text()
    assert "## passkey" in summary and "| cascade:cascades=2 |" in summary and "## ppl" in summary
    # report rebuilds the same summary from the folder alone
    (out / "summary.md").unlink()
    assert cli_main(["report", str(out)]) == 0 and (out / "summary.md").read_text() == summary
    # resume: nothing new to do; drop one row and only that one runs again
    lines = (out / "results.jsonl").read_text().splitlines()
    again = run_grid(model, tok, grid, out, model_name="tiny", ppl_text=PROSE, progress=False)
    assert len(again) == len(rows)
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = run_grid(model, tok, grid, out, model_name="tiny", ppl_text=PROSE, progress=False, report=False)
    assert len(again) == len(rows)
    assert json.loads(lines[-1])["score"] == pytest.approx(again[-1]["score"])  # same prompt, same answer
    # report=False leaves the summary alone (the re-run row's timing differs, so a rewrite could show)
    assert (out / "summary.md").read_text() == summary


def test_eval_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["eval", "passkey,niah_single", "--model", str(tiny_model_dir), "--policies", "streaming,tova",
                   "--budgets", "40", "--lengths", "128", "--samples", "2", "--chunk-size", "32", "--quiet",
                   "--out", str(out)])
    assert rc == 0
    assert len(read_rows(out)) == 8
    assert "## niah_single" in capsys.readouterr().out


def test_eval_workers_write_the_same_rows_as_one_process(tiny_model_dir, tmp_path):
    common = ["eval", "passkey,vt", "--model", str(tiny_model_dir), "--policies", "streaming,h2o", "--budgets", "40",
              "--lengths", "96,128", "--samples", "2", "--chunk-size", "32", "--quiet"]
    assert cli_main(common + ["--out", str(tmp_path / "one")]) == 0
    two = tmp_path / "two"
    assert cli_main(common + ["--out", str(two), "--workers", "3"]) == 0
    key = lambda r: (r["task"], r["policy"], r["length"], r["depth"], r["sample"])  # noqa: E731
    one_rows = sorted(read_rows(tmp_path / "one"), key=key)
    two_rows = sorted(read_rows(two), key=key)
    assert len(one_rows) == len(two_rows) == 2 * 2 * 2 * 2
    assert [(key(r), r["answer"], r["score"]) for r in one_rows] == [(key(r), r["answer"], r["score"]) for r in two_rows]
    assert (two / "summary.md").exists() and not list(two.glob("worker-*.log")) and not list(two.glob(".shard-*"))
    # a shard runs only its share: every third row of the grid
    shard = tmp_path / "shard"
    assert cli_main(common + ["--out", str(shard), "--shard", "1/3"]) == 0
    assert len(read_rows(shard)) == 5 and not (shard / "summary.md").exists()


@pytest.mark.parametrize("argv,msg", [
    (["eval", "nosuchtask"], "unknown task"),
    (["eval", "passkey", "--workers", "0"], "--workers must be"),
    (["eval", "passkey", "--shard", "3/2"], "bad shard"),
    (["eval", "passkey", "--policies", "nosuch"], "unknown policy"),
    (["eval", "passkey", "--budgets", "big"], "bad --budgets"),
    (["eval", "passkey", "--lengths", "lots"], "bad length"),
    (["eval", "passkey", "--depths", "2"], "depth must be in"),
    (["eval", "passkey", "--samples", "0"], "samples must be"),
    (["eval", "passkey", "--lengths", "all"], "ppl task only"),
    (["eval", "ppl", "--text", "/nonexistent.txt", "--policies", "full"], "cannot read text file"),
    (["eval", "passkey", "--policies", "streaming", "--budgets", "2"], "sink"),
    (["report", "/nonexistent-dir"], "is not a folder"),
    (["eval", "niah_single:colour=red", "--model", "/nonexistent-model"], "bad option"),
] + ([(["bench", "decode"], "CUDA")] if not __import__("torch").cuda.is_available() else []))
def test_eval_cli_errors(argv, msg, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and msg in err[0], err


def test_shipped_kjv_text_needs_no_system_package(tok, monkeypatch):
    """The default perplexity text and prose haystack come from the package itself (checksum-checked)."""
    import shutil

    import kvcascade.texts as ppl

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)  # no `bible` command anywhere
    ppl.kjv_text.cache_clear()
    text = ppl.kjv_text()
    assert len(text) == 4_298_239 and text.lstrip().startswith("Genesis 1") and "Lord Jesus Christ" in text[-200:]
    s = make_sample("niah_multikey", tok, 1024, 0.5)
    assert "special magic numbers" in s.prompt


def test_corrupt_kjv_text_is_a_clear_error(tmp_path, monkeypatch):
    import lzma

    import kvcascade.texts as ppl

    bad = tmp_path / "kjv.txt.xz"
    bad.write_bytes(lzma.compress(b"In the beginning"))
    monkeypatch.setattr(ppl, "KJV_FILE", bad)
    ppl.kjv_text.cache_clear()
    try:
        with pytest.raises(KVCascadeError, match="corrupt"):
            ppl.kjv_text()
        bad.write_bytes(b"not xz")
        with pytest.raises(KVCascadeError, match="cannot read the shipped"):
            ppl.kjv_text()
    finally:
        ppl.kjv_text.cache_clear()


SMALL = dict(tasks=["passkey"], policies=["streaming"], budgets=[40], lengths=[96], samples=2, chunk_size=32)


def test_rerun_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    """Rows of another model, seed, chunk size or text are never mixed into a folder (nor taken as done)."""
    model, tok = _tiny(tiny_model_dir)
    out = tmp_path / "ev"
    run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False, report=False)
    for change, msg in [({}, "model"), ({"seed": 1}, "seed"), ({"chunk_size": 16}, "chunk_size")]:
        name = "other" if not change else "tiny"
        with pytest.raises(KVCascadeError, match=f"other settings .*{msg}"):
            run_grid(model, tok, Grid(**{**SMALL, **change}), out, model_name=name, progress=False)
    with pytest.raises(KVCascadeError, match="haystack_sha256"):
        run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", prose=PROSE, progress=False)
    # a folder written before grid.json existed: its rows' model decides
    (out / "grid.json").unlink()
    with pytest.raises(KVCascadeError, match="model 'tiny' there, 'other' now"):
        run_grid(model, tok, Grid(**SMALL), out, model_name="other", progress=False)
    assert len(read_rows(out)) == 2


def test_torn_last_line_is_repaired_and_rerun(tiny_model_dir, tmp_path):
    model, tok = _tiny(tiny_model_dir)
    out = tmp_path / "ev"
    rows = run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False, report=False)
    text = (out / "results.jsonl").read_text()
    torn = text[: len(text) - 40]  # the last row cut mid-way, as a killed write leaves it
    (out / "results.jsonl").write_text(torn)
    again = run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False, report=False)
    assert len(again) == len(rows) == 2
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)  # every line whole again
    assert (out / "results.jsonl.torn").read_text().strip() == torn.splitlines()[-1]  # nothing thrown away
    # a last row that only lost its newline is kept as it is
    (out / "results.jsonl").write_text("\n".join(lines))
    assert len(run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False, report=False)) == 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_a_folder_in_use_is_refused_and_duplicates_are_counted_once(tiny_model_dir, tmp_path):
    from kvcascade.eval.report import write_report
    from kvcascade.eval.runner import folder_lock

    model, tok = _tiny(tiny_model_dir)
    out = tmp_path / "ev"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(KVCascadeError, match="in use by another kvcascade eval"):
            run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False)
    run_grid(model, tok, Grid(**SMALL), out, model_name="tiny", progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines + lines) + "\n")  # e.g. two old runs wrote the same rows
    write_report(out)
    assert "- rows: 2" in (out / "summary.md").read_text()
    assert len(read_rows(out, unique=True)) == 2


def test_a_failing_row_is_recorded_and_the_grid_goes_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import kvcascade.eval.runner as runner
    from kvcascade.eval.runner import missing_rows

    model, tok = _tiny(tiny_model_dir)
    out = tmp_path / "ev"
    real = runner.run_one

    def flaky(model, tok, task, pol, budget, length, depth, index, *a, **k):
        if index == 0:
            raise RuntimeError("boom")
        return real(model, tok, task, pol, budget, length, depth, index, *a, **k)

    monkeypatch.setattr(runner, "run_one", flaky)
    grid = Grid(**SMALL)
    rows = run_grid(model, tok, grid, out, model_name="tiny", progress=False)
    assert len(rows) == 2 and sum(1 for r in rows if r.get("error")) == 1
    missing, failed = missing_rows(grid, rows)
    assert len(missing) == 1 and "boom" in failed[0]["error"]
    summary = (out / "summary.md").read_text()
    assert "## Failed rows (1" in summary and "RuntimeError: boom" in summary and "(1) |" in summary
    monkeypatch.setattr(runner, "run_one", real)  # fixed: the rerun tries only the failed row again
    rows = run_grid(model, tok, grid, out, model_name="tiny", progress=False)
    assert len(rows) == 2 and not any(r.get("error") for r in rows)
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    assert "Failed rows" not in (out / "summary.md").read_text()


def test_eval_cli_exits_nonzero_when_rows_fail(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import kvcascade.eval.runner as runner

    def broken(*a, **k):
        return {"score": float("nan")}

    monkeypatch.setattr(runner, "run_one", broken)
    rc = cli_main(["eval", "passkey", "--model", str(tiny_model_dir), "--policies", "window", "--budgets", "40",
                   "--lengths", "96", "--samples", "2", "--quiet", "--out", str(tmp_path / "e")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "2 of 2 grid rows did not finish" in err and "not a finite number" in err


def test_report_on_foreign_rows_is_one_clear_line(tmp_path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    (d / "results.jsonl").write_text('{"task": "passkey", "score": 1}\n')
    assert cli_main(["report", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and "not a kvcascade eval" in err[0]
    (d / "results.jsonl").write_text('[1, 2]\n"x"\n')
    assert cli_main(["report", str(d)]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["eval", "ppl", "--policies", "full", "--chunk-size", "-1"], "chunk size must be a positive"),
    (["eval", "ppl", "--policies", "full", "--chunk-size", "0"], "chunk size must be a positive"),
    (["eval", "ppl", "--policies", "full", "--bucket", "0"], "ppl bucket must be a positive"),
    (["eval", "vt:chains=0"], "chains must be a whole number >= 1"),
    (["eval", "cwe:common=0"], "common must be a whole number >= 1"),
    (["eval", "fwe:vocab=0"], "vocab must be a whole number >= 4"),
    (["eval", "fwe:alpha=nan"], "alpha must be a number"),
    (["eval", "passkey", "--policies", "streaming:budget=50", "--budgets", "64"], "budget is given twice"),
])
def test_eval_bad_settings_are_one_line_before_any_work(argv, msg, capsys):
    assert cli_main(argv + ["--model", "/nonexistent-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvcascade: error:") and msg in err[0], err


def test_perplexity_refuses_a_bad_chunk_size(tiny_model_dir):
    from kvcascade.eval.ppl import streaming_perplexity

    model, tok = _tiny(tiny_model_dir)
    for kw in ({"chunk_size": -1}, {"chunk_size": 0}, {"bucket": 0}):
        with pytest.raises(KVCascadeError, match="must be a positive"):
            streaming_perplexity(model, tok, "w1 w2 w3 w4", policy="full", **kw)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey:haystack=prose"])
def test_query_first_puts_the_question_before_the_text(tok, task):
    plain = make_sample(task, tok, 2048, 0.5, seed=3, prose=PROSE)
    q = make_sample(f"{task}:query_first=1", tok, 2048, 0.5, seed=3, prose=PROSE)
    assert abs(q.tokens - 2048) <= 0.01 * 2048 and q.answers == plain.answers
    first = q.prompt.split("\n\n")[0]
    assert first.endswith("?") and first not in plain.prompt[:len(first) + 5]
    assert q.prompt.rstrip().endswith(plain.prompt.rstrip()[-40:])  # same question at the end
    with pytest.raises(KVCascadeError, match="query_first must be one of"):
        make_sample(f"{task}:query_first=yes", tok, 2048, 0.5, prose=PROSE)

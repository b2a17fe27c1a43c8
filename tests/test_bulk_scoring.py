"""Bulk scoring (07_chat.py --input/--output) cannot mix files: a partial output is resumed only
by the run it belongs to (same input, model, threshold and format), two runs cannot write one
output, --output never replaces the input or lands somewhere unasked, and a bad line in the input
stops the run with its line number before anything is scored (so no line is ever lost)."""

import fcntl
import json
import subprocess
import sys

import pytest

import tiny
from conftest import ROOT
from smslora import artifacts
from smslora.commands import chat as chat_cmd


def messages(prefix, n):
    return [f"{prefix} message number {i}, call 0800 now" for i in range(n)]


def write_input(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def classify(model, src, out, *flags):
    chat_cmd.main(["--model", str(model), "--input", str(src), "--output", str(out),
                   *map(str, flags)])


def fails(capsys, argv, needle):
    """07_chat.py's main(argv) exits 2 with one line on stderr that contains needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        chat_cmd.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err
    return err


def interrupted(monkeypatch, model, src, out, *flags):
    """A run stopped by Ctrl-C after its first chunk of 256 verdicts: what it leaves behind."""
    import smslora.classify

    real, calls = smslora.classify.score_logits, []

    def second_chunk_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(smslora.classify, "score_logits", second_chunk_interrupted)
    with pytest.raises(SystemExit) as e:
        classify(model, src, out, *flags)
    monkeypatch.undo()
    assert e.value.code == 130
    partial = out.with_name(out.name + ".partial")
    assert len(partial.read_text().splitlines()) == 256 and not out.exists()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("other") / "model", quantize=True, seed=1)


# ---------------------------------------------------------------------------------------------
# Resuming.


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, tiny_model, monkeypatch, capsys):
    src, out = write_input(tmp_path / "a.jsonl", messages("A", 300)), tmp_path / "out.jsonl"
    interrupted(monkeypatch, tiny_model, src, out)
    capsys.readouterr()
    classify(tiny_model, src, out)
    assert "resuming" in capsys.readouterr().err
    assert [r["text"] for r in artifacts.read_jsonl(out)] == messages("A", 300)
    assert not list(tmp_path.glob("*.partial*"))


def test_another_input_of_the_same_length_starts_over(tmp_path, tiny_model, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    interrupted(monkeypatch, tiny_model, write_input(tmp_path / "a.jsonl", messages("A", 300)),
                out)
    capsys.readouterr()
    classify(tiny_model, write_input(tmp_path / "b.jsonl", messages("B", 300)), out)
    err = capsys.readouterr().err
    assert "starting over" in err and "another input" in err and "resuming" not in err
    assert [r["text"] for r in artifacts.read_jsonl(out)] == messages("B", 300)


def test_a_partial_longer_than_the_input_starts_over(tmp_path, tiny_model, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    interrupted(monkeypatch, tiny_model, write_input(tmp_path / "a.jsonl", messages("A", 300)),
                out)
    src = write_input(tmp_path / "a.jsonl", messages("A", 10))  # same name, 10 lines now
    capsys.readouterr()
    classify(tiny_model, src, out)
    assert "starting over" in capsys.readouterr().err
    assert [r["text"] for r in artifacts.read_jsonl(out)] == messages("A", 10)


def test_a_partial_without_a_record_and_other_texts_starts_over(tmp_path, tiny_model, capsys):
    """A partial file with no record (an older version's) is resumed only line by line: here
    its texts are another file's."""
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text("".join(
        json.dumps({"text": t, "label": "ham", "p_spam": 0.123456}) + "\n"
        for t in messages("A", 5)))
    capsys.readouterr()
    classify(tiny_model, write_input(tmp_path / "b.jsonl", messages("B", 5)), out)
    assert "starting over" in capsys.readouterr().err
    rows = artifacts.read_jsonl(out)
    assert [r["text"] for r in rows] == messages("B", 5)
    assert all(r["p_spam"] != 0.123456 for r in rows)


@pytest.mark.parametrize("change", ["threshold", "model"])
def test_another_threshold_or_model_on_resume_starts_over(tmp_path, tiny_model, other_model,
                                                          monkeypatch, capsys, change):
    src, out = write_input(tmp_path / "a.jsonl", messages("A", 300)), tmp_path / "out.jsonl"
    interrupted(monkeypatch, tiny_model, src, out, "--threshold", "0.5")
    capsys.readouterr()
    if change == "threshold":
        classify(tiny_model, src, out, "--threshold", "0")
    else:
        classify(other_model, src, out, "--threshold", "0.5")
    err = capsys.readouterr().err
    assert "starting over" in err and change in err
    rows = artifacts.read_jsonl(out)
    assert len(rows) == 300
    if change == "threshold":
        assert {r["label"] for r in rows} == {"spam"}  # every verdict at the new threshold
    else:
        classify(other_model, src, tmp_path / "fresh.jsonl", "--threshold", "0.5")
        assert rows == artifacts.read_jsonl(tmp_path / "fresh.jsonl")


# ---------------------------------------------------------------------------------------------
# The output.


def test_two_runs_cannot_write_one_output(tmp_path, tiny_model, capsys):
    src, out = write_input(tmp_path / "a.jsonl", messages("A", 5)), tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    with open(partial, "a+b") as running:  # what a run in progress holds
        fcntl.flock(running, fcntl.LOCK_EX)
        running.write(b'{"text": "A message number 0, call 0800 now", "label": "ham"')
        running.flush()
        fails(capsys, ["--model", tiny_model, "--input", src, "--output", out],
              "another run is writing")
        assert partial.read_bytes().endswith(b'"label": "ham"') and not out.exists()
    classify(tiny_model, src, out)  # once it has ended
    assert len(artifacts.read_jsonl(out)) == 5


def test_output_equal_to_input_is_refused(tmp_path, tiny_model, capsys):
    src = write_input(tmp_path / "a.jsonl", messages("A", 3))
    before = src.read_bytes()
    fails(capsys, ["--model", tiny_model, "--input", src, "--output", src], "would replace")
    (tmp_path / "link.jsonl").symlink_to(src)
    fails(capsys, ["--model", tiny_model, "--input", src, "--output", tmp_path / "link.jsonl"],
          "would replace")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "link.jsonl"]


def test_output_an_existing_folder_is_refused(tmp_path, tiny_model, capsys):
    src = write_input(tmp_path / "a.jsonl", messages("A", 3))
    (tmp_path / "verdicts").mkdir()
    fails(capsys, ["--model", tiny_model, "--input", src, "--output", tmp_path / "verdicts"],
          "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "verdicts"]
    assert not list((tmp_path / "verdicts").iterdir())


def test_output_in_a_missing_folder_is_refused(tmp_path, tiny_model, capsys):
    src = write_input(tmp_path / "a.jsonl", messages("A", 3))
    fails(capsys, ["--model", tiny_model, "--input", src, "--output",
                   tmp_path / "no" / "such" / "out.jsonl"], "create it first")
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------
# Bad lines in the input: named by line, before anything is scored.

BAD_LINES = {
    "lone surrogate": ("in.jsonl", lambda: '{"text": "\\ud800 WIN"}\n',
                       "line 280: the message holds a lone surrogate"),
    "nested 100,000 deep": ("in.jsonl", lambda: '{"text": ' + "[" * 100_000 + "]" * 100_000
                            + "}\n", "line 280: JSON nested too deeply"),
    "CSV field over 131,072 characters": ("in.csv", lambda: '"' + "x" * 140_000 + '"\n',
                                          "line 281: not CSV (field larger than field limit"),
    "not UTF-8": ("in.txt", lambda: "caf\udce9 WIN\n", "line 280: not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_stops_the_run_before_any_scoring(tmp_path, tiny_model, capsys, monkeypatch,
                                                     case):
    """The bad line is number 280, in the second chunk of 256: the first chunk is not scored and
    written (and then lost with the rest), the run stops before the model is loaded."""
    name, bad, needle = BAD_LINES[case]
    lines = [json.dumps({"text": t}) + "\n" for t in messages("A", 300)]
    if name == "in.csv":
        lines = ["text\n"] + [f"{t}\n" for t in messages("A", 300)]
    elif name == "in.txt":
        lines = [f"{t}\n" for t in messages("A", 300)]
    lines[279 if name != "in.csv" else 280] = bad()
    src = tmp_path / name
    src.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr("smslora.model.load_model", lambda *a, **k: pytest.fail("loaded"))
    fails(capsys, ["--model", tiny_model, "--input", src, "--output", out], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_non_utf8_bytes_typed_into_the_chat(tiny_model):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "07_chat.py"), "--model",
                        str(tiny_model)], input=b"caf\xe9 WIN now\nhello\n\n",
                       capture_output=True, cwd=ROOT, timeout=300)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "not UTF-8 text" in out and out.count("P(spam)=") == 1, out

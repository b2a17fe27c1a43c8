"""The bad-input corpus: whatever a user throws at the scripts gets one clear line on stderr and
exit code 2 (never a traceback), and every artifact written before is left exactly as it was.
Some inputs that look odd are fine (a BOM, "SPAM", a message of emoji, 100 KB of text): those
must simply work. The HTTP API's cases are in test_serve.py (BAD)."""

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

import tiny
from smslora import artifacts, paths
from smslora.commands import chat as chat_cmd
from smslora.commands import evaluate as evaluate_cmd
from smslora.commands import prepare as prepare_cmd
from smslora.commands import train as train_cmd
from smslora.data import clean, read_rows
from smslora.model import load_model



def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, main, argv, needle):
    """main(argv) exits 2 with exactly one line on stderr that contains needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in err, err
    return err


@pytest.fixture
def previous(tmp_path, data_dir):
    """An output folder holding the artifacts of an earlier good run."""
    out = tmp_path / "out"
    shutil.copytree(data_dir, out)
    (out / "eval_retrained.json").write_text('{"earlier": true}\n')
    return out


# ---------------------------------------------------------------------------------------------
# Data loading (step 2): each case is a source file.

DATA = {
    "empty file": ("in.tsv", b"", "is empty"),
    "only whitespace": ("in.tsv", b" \n\t\n\r\n", "is empty"),
    "binary file": ("in.tsv", bytes(range(256)) * 64, "not valid UTF-8"),
    "huge file, one line": ("in.tsv", b"x" * 5_000_000, "line 1: field larger than"),
    "wrong delimiter": ("in.csv", b"label;text\nspam;WIN now\nham;see you\n", "expected label,text"),
    "no tab in a TSV": ("in.tsv", b"spam hi there\n", "line 1: expected label<TAB>text"),
    "mixed encodings": ("in.tsv", "ham\tcafé ok\nham\tfine\n".encode() + b"spam\tcaf\xe9\n",
                        "line 3: not valid UTF-8"),
    "label in another language": ("in.tsv", "spam\tWIN\npourriel\tGAGNEZ\n".encode(),
                                  "unknown label 'pourriel'"),
    "label is a number": ("in.jsonl", b'{"text": "hi", "label": 7}\n', "unknown label '7'"),
    "message of control characters": ("in.tsv", b"ham\tok\nspam\t\x01\x02\x7f\n",
                                      "line 2: empty message"),
    "message of NULs in a CSV": ("in.csv", b"label,text\nspam,\x00\x00\n", "line 2: empty message"),
    "message of blanks": ("in.jsonl", b'{"text": " \\u200b\\t ", "label": "ham"}\n',
                          "line 1: empty message"),
    "JSONL line not an object": ("in.jsonl", b'{"text": "a", "label": "ham"}\n[1]\n',
                                 "line 2: not a JSON object"),
    "JSONL without a text field": ("in.jsonl", b'{"msg": "a", "label": "ham"}\n', "no text column"),
    "CSV without a label column": ("in.csv", b"text,kind\nhello,ham\n", "no label column"),
    "only one class": ("in.tsv", b"ham\thello\nham\tthere\nham\tyou\n", "no spam messages"),
    "missing file": (None, None, "not found"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_bad_dataset(tmp_path, previous, capsys, case):
    name, content, needle = DATA[case]
    src = tmp_path / (name or "absent.tsv")
    if content is not None:
        src.write_bytes(content)
    before = snapshot(previous)
    fails(capsys, prepare_cmd.main, ["--source", src, "--out", previous], needle)
    assert snapshot(previous) == before


def test_a_directory_as_the_dataset(tmp_path, previous, capsys):
    before = snapshot(previous)
    fails(capsys, prepare_cmd.main, ["--source", tmp_path, "--out", previous], "not found")
    assert snapshot(previous) == before


@pytest.mark.parametrize("flags,needle", [
    (["--test-fraction", "0"], "between 0 and 1"),
    (["--test-fraction", "1.5"], "between 0 and 1"),
    (["--train-per-class", "-5"], "positive"),
    (["--valid-per-class", "0"], "positive"),
    (["--train-per-class", "99999"], "need"),
    (["--calibration-ham", "-1"], "0 or more"),
    (["--calibration-ham", "99999"], "--calibration-ham"),
    (["--supplement-holdout", "-1"], "0 or more"),
    (["--supplement-holdout", "500"], "--supplement-holdout asks for 500"),
])
def test_bad_counts(previous, capsys, flags, needle):
    before = snapshot(previous)
    fails(capsys, prepare_cmd.main, [*flags, "--out", previous], needle)
    assert snapshot(previous) == before


def test_odd_but_valid_data_is_read_correctly(tmp_path):
    """A BOM, Windows line ends, labels in capitals, emoji-only and 100 KB messages."""
    long = "free entry " * 9100  # ~100 KB
    src = tmp_path / "odd.tsv"
    src.write_bytes(("\ufeffSPAM\tWIN a prize\r\nHam\t😂😂👍\r\nspam\t" + long + "\r\n").encode())
    rows = clean(read_rows(src))
    assert [r["label"] for r in rows] == ["spam", "ham", "spam"]
    assert rows[0]["message"] == "WIN a prize" and rows[1]["message"] == "😂😂👍"
    assert len(rows[2]["message"]) == len(long.strip())


@pytest.mark.parametrize("error,needle", [
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
], ids=["read-only folder", "full disk"])
def test_unwritable_output_folder(previous, capsys, monkeypatch, error, needle):
    """A read-only folder (simulated: the tests may run as root) or a full disk mid-write."""
    real_fsync = artifacts.os.fsync
    writes = []

    def failing_fsync(fd):  # the file's bytes were written; committing them fails
        writes.append(fd)
        if len(writes) >= 2:  # let one file through: the failure comes part way
            error.filename = "out"
            raise error
        real_fsync(fd)

    monkeypatch.setattr(artifacts.os, "fsync", failing_fsync)
    before = snapshot(previous)
    fails(capsys, prepare_cmd.main, ["--out", previous], needle)
    after = snapshot(previous)
    assert not [p for p in after if str(p).endswith(".tmp")]  # no temporary left behind
    changed = [p for p in after if after[p] != before.get(p)]
    assert all(after[p] == before[p] for p in before if p not in changed)
    # at most the one file that was committed whole before the failure; nothing half-written
    assert len(changed) <= 1
    for p in changed:
        artifacts.read_jsonl(previous / p) if str(p).endswith(".jsonl") else json.loads(after[p])


@pytest.mark.parametrize("damage,needle", [
    ("mixed", "not the file split.json describes"),
    ("truncated", "not the file split.json describes"),
    ("unlisted and garbled", "is damaged"),
])
def test_splits_of_another_run_or_damaged_are_refused(tmp_path, previous, tiny_model, capsys,
                                                     damage, needle):
    """What an interrupted step 2 or a hand edit could leave: training and evaluation refuse it
    rather than train on test messages."""
    test = previous / "test.jsonl"
    if damage == "mixed":
        valid = (previous / "valid.jsonl").read_bytes()
        test.write_bytes(valid)  # another run's file under this name
    elif damage == "truncated":
        test.write_bytes(test.read_bytes()[:-40])
    else:
        manifest = json.loads((previous / "split.json").read_text())
        del manifest["sha256"]["test"]
        (previous / "split.json").write_text(json.dumps(manifest))
        test.write_bytes(b'{"message": "hi", "label": "ham"}\n{garbled\n')
    fails(capsys, evaluate_cmd.main, ["--model", tiny_model, "--data", previous, "--out",
                                  tmp_path / "rep"], needle)
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------
# Training configuration (step 3).

CONFIGS = {
    "batch size zero": (b"batch_size: 0\n", "batch_size must be positive"),
    "negative learning rate": (b"learning_rate: -1.0e-4\n", "learning_rate must be positive"),
    "rank zero": (b"lora_rank: 0\n", "lora_rank must be positive"),
    "no supplement": (b"supplement_repeats: 0\n", "supplement_repeats must be positive"),
    "float for an int": (b"iters: 1.5\n", "iters: expected int"),
    "bool for an int": (b"iters: true\n", "iters: expected int"),
    "unknown schedule": (b"lr_schedule: linear\n", "lr_schedule must be"),
    "tab-indented YAML": (b"iters:\n\t- 3\n", "not valid YAML"),
    "not UTF-8": (b"iters: 10 # caf\xe9\n", "not UTF-8"),
    "unknown key, misspelt": (b"learning_rte: 1.0e-4\n", "unknown config key(s): learning_rte"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config(tmp_path, capsys, case):
    content, needle = CONFIGS[case]
    (tmp_path / "bad.yaml").write_bytes(content)
    fails(capsys, train_cmd.main, ["--config", tmp_path / "bad.yaml",
                               "--adapter-path", tmp_path / "ad"], needle)
    assert not (tmp_path / "ad").exists() and not (tmp_path / ".ad.partial").exists()


def test_more_lora_layers_than_the_model_has(tmp_path, tiny_model, data_dir, capsys):
    fails(capsys, train_cmd.main, ["--model", tiny_model, "--data", data_dir, "--num-layers", "9",
                               "--adapter-path", tmp_path / "ad"], "the model has 2")
    assert not (tmp_path / "ad").exists()


def test_a_bad_compile_switch_stops_training_before_any_work(tmp_path, tiny_model, data_dir,
                                                            capsys, monkeypatch):
    monkeypatch.setenv("SMS_LORA_COMPILE_STEP", "yes")
    monkeypatch.setattr("smslora.finetune.load_model",
                        lambda *a, **k: pytest.fail("loaded a model"))
    fails(capsys, train_cmd.main, ["--model", tiny_model, "--data", data_dir,
                               "--adapter-path", tmp_path / "ad"], "SMS_LORA_COMPILE_STEP='yes'")
    assert not (tmp_path / "ad").exists() and not (tmp_path / ".ad.partial").exists()


# ---------------------------------------------------------------------------------------------
# Model folders (every step that loads one goes through load_model).


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model, data_dir):
    ad = tmp_path_factory.mktemp("ad") / "adapters"
    train_cmd.main(["--config", "seed", "--model", str(tiny_model), "--data", str(data_dir),
                "--adapter-path", str(ad), "--reports", str(ad.parent / "rep"), "--iters", "2",
                "--num-layers", "2"])
    return ad


def break_model(kind, model, adapters, tmp_path):
    """Damage a copy of the tiny model (or of its adapters) as `kind` says; return the argv
    of step 4 that then has to fail."""
    argv = ["--model", model, "--data", tmp_path, "--out", tmp_path / "reports"]
    ad = tmp_path / "adapters"
    shutil.copytree(adapters, ad)
    if kind == "no config.json":
        (model / "config.json").unlink()
    elif kind == "no weights":
        for p in model.glob("*.safetensors"):
            p.unlink()
    elif kind == "no tokenizer":
        (model / "tokenizer.json").unlink()
    elif kind == "truncated weights":
        w = next(model.glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif kind == "config not JSON":
        (model / "config.json").write_text("{not json")
    elif kind == "weights changed after writing":
        artifacts.write_checksums(model, "scripts/01_download_model.py")
        w = next(model.glob("*.safetensors"))
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))
    elif kind == "asks to run its own code":
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.M"}}))
    elif kind == "adapters of another model":
        other = tiny.make_tiny_model(tmp_path / "other", hidden_size=32, num_attention_heads=4,
                                     num_key_value_heads=2)
        argv[1] = other
        return argv + ["--adapter-path", ad]
    elif kind == "adapters missing a tensor":
        w = dict(mx.load(str(ad / "adapters.safetensors")))
        w.pop(sorted(w)[0])
        mx.save_safetensors(str(ad / "adapters.safetensors"), w)
        (ad / paths.CHECKSUMS).unlink()
        return argv + ["--adapter-path", ad]
    elif kind == "adapters for more layers":
        cfg = json.loads((ad / "adapter_config.json").read_text())
        (ad / "adapter_config.json").write_text(json.dumps({**cfg, "num_layers": 7}))
        return argv + ["--adapter-path", ad]
    elif kind == "no adapter weights":
        (ad / "adapters.safetensors").unlink()
        return argv + ["--adapter-path", ad]
    elif kind == "threshold.json cut short":
        (ad / paths.THRESHOLD_FILE).write_text('{"threshold": 0.9')
        return argv + ["--adapter-path", ad]
    elif kind == "threshold out of range":
        (ad / paths.THRESHOLD_FILE).write_text('{"threshold": 7}')
        return argv + ["--adapter-path", ad]
    return argv


MODELS = {
    "no config.json": "01_download_model.py",
    "no weights": "no .safetensors weights",
    "no tokenizer": "cannot load the model",
    "truncated weights": "cannot load the model",
    "config not JSON": "config.json is not valid JSON",
    "weights changed after writing": "does not match its SHA-256",
    "asks to run its own code": "--trust-remote-code",
    "adapters of another model": "mismatch(es)",
    "adapters missing a tensor": "1 adapter tensor(s) missing",
    "adapters for more layers": "num_layers=7",
    "no adapter weights": "adapters.safetensors missing",
    "threshold.json cut short": "threshold.json is damaged",
    "threshold out of range": "must be a number from 0 to 1, not 7",
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_bad_model_folder(tmp_path, model_copy, adapters, data_dir, capsys, kind):
    shutil.copy(data_dir / "test.jsonl", tmp_path / "test.jsonl")
    argv = break_model(kind, model_copy, adapters, tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "eval_retrained.json").write_text("{}\n")
    fails(capsys, evaluate_cmd.main, argv + ["--name", "retrained"], MODELS[kind])
    assert snapshot(tmp_path / "reports") == {Path("eval_retrained.json"): b"{}\n"}


def test_remote_code_is_allowed_only_by_the_flag(tmp_path, model_copy, data_dir):
    cfg = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.M"}}))
    (model_copy / "x.py").write_text("raise SystemExit('executed!')\n")
    model, _ = load_model(model_copy, trust_remote_code=True)  # said so: loads
    assert len(model.layers) == 2  # and x.py was still never imported (mlx-lm's llama module)


# ---------------------------------------------------------------------------------------------
# Files to classify (step 7).

CHAT = {
    "empty file": ("in.txt", b"", "has no messages"),
    "binary file": ("in.txt", bytes(range(256)), "not UTF-8"),
    "control characters only": ("in.txt", b"fine\n\x01\x02\x03\n", "line 2: only control"),
    "blank JSON message": ("in.jsonl", b'{"text": "ok"}\n{"text": "\\t \\u200b"}\n',
                           "line 2: empty message"),
    "JSON text not a string": ("in.jsonl", b'{"text": ["a"]}\n', "line 1: expected an object"),
    "CSV without a text column": ("in.csv", b"message\nhello\n", "no 'text' column"),
    "missing file": (None, None, "not found"),
}


@pytest.mark.parametrize("case", list(CHAT))
def test_bad_file_to_classify(tmp_path, tiny_model, capsys, case):
    name, content, needle = CHAT[case]
    src = tmp_path / (name or "absent.txt")
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "verdicts.jsonl"
    out.write_text("earlier\n")
    fails(capsys, chat_cmd.main, ["--model", tiny_model, "--input", src, "--output", out], needle)
    assert out.read_text() == "earlier\n"


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_threshold_outside_0_to_1_is_refused_before_loading(tmp_path, tiny_model, capsys,
                                                              monkeypatch, value):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    monkeypatch.setattr("smslora.model.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    fails(capsys, chat_cmd.main, ["--model", tiny_model, "--input", src, "--output",
                              tmp_path / "out.jsonl", "--threshold", value], "--threshold must be")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("error,needle", [
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
], ids=["read-only folder", "full disk"])
def test_verdicts_cannot_be_written(tmp_path, tiny_model, capsys, monkeypatch, error, needle):
    src = tmp_path / "in.txt"
    src.write_text("hello\nWIN a prize now\n")
    out = tmp_path / "verdicts.jsonl"
    out.write_text("earlier\n")
    def failing_fsync(fd):
        raise error

    monkeypatch.setattr(artifacts.os, "fsync", failing_fsync)
    fails(capsys, chat_cmd.main, ["--model", tiny_model, "--input", src, "--output", out], needle)
    assert out.read_text() == "earlier\n"


def test_odd_but_valid_messages_are_classified(tmp_path, tiny_model, capsys):
    src = tmp_path / "in.jsonl"
    rows = ["😂😂👍", "free entry " * 9100, "ﾃｽﾄ\u202eevil", "ok\r\nbye"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "verdicts.jsonl"
    chat_cmd.main(["--model", str(tiny_model), "--input", str(src), "--output", str(out)])
    got = artifacts.read_jsonl(out)
    assert [g["text"] for g in got] == rows
    assert all(g["label"] in ("spam", "ham") and 0 <= g["p_spam"] <= 1 for g in got)

"""Step 2: the split is deterministic, disjoint, stratified; bad input fails cleanly."""

import json

import pytest


from conftest import run_script
from smslora import artifacts, data, paths, splits, task



def test_split_counts_match_the_collection(tmp_path):
    m = splits.prepare("shipped", tmp_path)
    assert m["raw_rows"] == 5574
    assert m["distinct_messages"] == 5159
    assert m["counts"]["train"] == {"ham": 400, "spam": 400}
    assert m["counts"]["valid"] == {"ham": 80, "spam": 80}
    assert m["counts"]["test"] == {"ham": 903, "spam": 128}  # 20% of 4,517 ham and 642 spam
    assert m["counts"]["calibration"] == {"ham": 480, "spam": 0}
    assert m["counts"]["valid_modern"] == {"ham": 100, "spam": 100}  # 50 + 50 of each file
    assert m["counts"]["train_all"] == {"ham": 3354, "spam": 734}  # 300 + 300 modern of them
    assert [(f["file"], f["messages"], f["held_out"]) for f in m["supplement"]] == [
        ("modern_sms.jsonl", 400, 100), ("modern_sms_2.jsonl", 400, 100)]
    assert set(m["sha256"]) == {"train", "valid", "test", "train_all", "calibration",
                                "valid_modern"}
    # valid + calibration (560 ham, 80 spam) are at the test split's ratio, within 1%
    assert abs((80 + 480) / 80 - 903 / 128) / (903 / 128) < 0.01


def test_split_is_deterministic_and_disjoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    splits.prepare("shipped", a)
    splits.prepare("shipped", b)
    keys = {}
    names = ("train", "train_all", "valid", "calibration", "valid_modern", "test")
    for split in names:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
        keys[split] = {data.dedupe_key(r["message"]) for r in artifacts.read_jsonl(a / f"{split}.jsonl")}
    held_out = ("valid", "calibration", "valid_modern", "test")  # apart from every other split
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            if x in held_out or y in held_out:
                assert not keys[x] & keys[y], (x, y)
    assert keys["train"] <= keys["train_all"]
    other = tmp_path / "seed7"
    splits.prepare("shipped", other, seed=7)
    assert (other / "test.jsonl").read_bytes() != (a / "test.jsonl").read_bytes()


def test_lines_carry_the_tutorial_format(tmp_path):
    splits.prepare("shipped", tmp_path)
    row = artifacts.read_jsonl(tmp_path / "train.jsonl")[0]
    assert row["text"] == task.format_prompt(row["message"]) + task.COMPLETIONS[row["label"]]
    assert row["text"].startswith("Classify the following SMS message as spam or not spam.\nMessage: ")
    assert row["text"].endswith("\nClassification: spam") or row["text"].endswith(
        "\nClassification: not spam")


def test_train_all_is_every_message_outside_test_valid_and_calibration(tmp_path):
    m = splits.prepare("shipped", tmp_path, supplement=None)
    assert m["counts"]["train_all"] == {"ham": 4517 - 903 - 80 - 480, "spam": 642 - 128 - 80}
    train = {r["message"] for r in artifacts.read_jsonl(tmp_path / "train.jsonl")}
    train_all = {r["message"] for r in artifacts.read_jsonl(tmp_path / "train_all.jsonl")}
    assert train <= train_all


def test_supplement_goes_to_train_all_and_valid_modern_only(tmp_path):
    splits.prepare("shipped", tmp_path / "a", supplement=None)
    test_msg = artifacts.read_jsonl(tmp_path / "a" / "test.jsonl")[0]["message"]
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"text": "Your Evri parcel fee is due: evri-fee.top",
                                 "label": "spam"}) + "\n"
                     + json.dumps({"text": test_msg.upper(), "label": "ham"}) + "\n")
    m = splits.prepare("shipped", tmp_path / "b", supplement=extra, supplement_holdout=0)
    assert m["supplement"] == [{"file": "extra.jsonl", "messages": 1, "held_out": 0}]  # the
    # copy of a test message is dropped
    rows = artifacts.read_jsonl(tmp_path / "b" / "train_all.jsonl")
    assert sum(r["message"].startswith("Your Evri parcel") for r in rows) == 1
    assert artifacts.read_jsonl(tmp_path / "b" / "valid_modern.jsonl") == []
    with extra.open("a") as f:
        f.write(json.dumps({"text": "Your Royal Mail parcel is out for delivery today",
                            "label": "ham"}) + "\n")
    splits.prepare("shipped", tmp_path / "c", supplement=extra, supplement_holdout=1)
    held = artifacts.read_jsonl(tmp_path / "c" / "valid_modern.jsonl")  # one of each label
    assert sorted(r["label"] for r in held) == ["ham", "spam"]
    assert not any(r["message"].startswith("Your Royal Mail") for r in
                   artifacts.read_jsonl(tmp_path / "c" / "train_all.jsonl"))
    assert not any(r["message"].startswith("Your Evri") for r in
                   artifacts.read_jsonl(tmp_path / "c" / "train_all.jsonl"))
    for split in ("train", "valid", "calibration", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "b" / f"{split}.jsonl").read_bytes()


def test_shipped_supplement_never_repeats_an_evaluation_message():
    """modern_sms*.jsonl (training) and stress_suite.jsonl / the fixed messages (evaluation)
    are written apart: no message of one is in the other."""
    supplement = {data.dedupe_key(r["text"]) for f in paths.SUPPLEMENTS
                  for r in artifacts.read_jsonl(f)}
    for path in (paths.STRESS_SUITE, paths.FIXED_MESSAGES):
        evaluation = {data.dedupe_key(r["text"]) for r in artifacts.read_jsonl(path)}
        assert not supplement & evaluation


@pytest.mark.parametrize("suffix,content", [
    (".csv", "label,text\nspam,WIN a prize\nham,see you at 6\nHam,ok\nSPAM,Free entry\n"),
    (".jsonl", '{"text": "WIN a prize", "label": "spam"}\n{"text": "ok", "label": "ham"}\n'
               '{"text": "see you", "label": "not spam"}\n{"text": "Free", "label": 1}\n'),
    (".tsv", "spam\tWIN \"a\" prize\nham\tsee you at 6\nham\tok\nspam\tFree entry\n"),
])
def test_other_formats(tmp_path, suffix, content):
    src = tmp_path / f"in{suffix}"
    src.write_text(content, encoding="utf-8")
    rows = data.clean(data.read_rows(src))
    assert sorted(r["label"] for r in rows) == ["ham", "ham", "spam", "spam"]


def test_counts_must_be_positive(tmp_path):
    r = run_script("02_prepare_data.py", "--out", tmp_path, "--train-per-class", "0")
    assert r.returncode == 2 and "positive" in r.stderr
    r = run_script("02_prepare_data.py", "--out", tmp_path, "--train-per-class", "5000")
    assert r.returncode == 2 and "need" in r.stderr

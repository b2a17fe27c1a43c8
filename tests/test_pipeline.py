"""Steps 3-7 end to end on a tiny random model, in a temp folder, as the scripts are run."""

import json

import mlx.core as mx
import numpy as np
import pytest

import tiny
from conftest import run_script
from smslora import artifacts, baselines, fuse, scoring, task
from smslora.commands import fuse as fuse_cmd
from smslora.model import load_model
from smslora.pipeline import Step, default_steps, run_steps



@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, data_dir):
    """Adapters trained for a few steps, then given large random B matrices so that the
    adapter visibly changes the logits (a zero-initialised B would make parity checks vacuous)."""
    ad = tmp_path_factory.mktemp("run") / "adapters"
    r = run_script("03_train.py", "--model", tiny_model, "--data", data_dir, "--adapter-path", ad,
                   "--reports", ad.parent / "reports", "--iters", "8", "--num-layers", "2")
    assert r.returncode == 0, r.stderr
    return tiny.strengthen_adapters(ad)


def test_fused_model_matches_base_plus_adapter(tmp_path, tiny_model, trained, data_dir):
    fused = tmp_path / "fused"
    r = run_script("06_fuse.py", "--model", tiny_model, "--adapter-path", trained,
                   "--save-path", fused, "--data", data_dir, "--out", tmp_path / "reports")
    assert r.returncode == 0, r.stderr
    assert "| fused   |" in r.stdout
    check = json.loads((tmp_path / "reports" / "fuse_check.json").read_text())
    assert check["passed"] and check["verdicts_differ"] == 0 and check["messages"] == 1031
    assert (fused / "threshold.json").read_text() == (trained / "threshold.json").read_text()
    assert "quantization" not in json.loads((fused / "config.json").read_text())

    messages = [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:40]]
    base = scoring.score_logits(*load_model(tiny_model), messages)
    with_adapter = scoring.score_logits(*load_model(tiny_model, trained), messages)
    fused_logits = scoring.score_logits(*load_model(fused), messages)
    assert np.abs(with_adapter - base).max() > 0.1  # the adapter matters...
    np.testing.assert_allclose(fused_logits, with_adapter, atol=5e-3)  # ...and fusing keeps it


def test_fuse_reuses_the_evaluation_only_when_it_scored_the_same_weights(tmp_path, tiny_model,
                                                                          trained, data_dir):
    """--reuse: 04_evaluate's logits stand for the adapter side of the check, giving the very
    figures of a check that computes both sides; an evaluation of other adapters is not used."""
    rep = tmp_path / "reports"
    r = run_script("04_evaluate.py", "--model", tiny_model, "--adapter-path", trained,
                   "--data", data_dir, "--name", "retrained", "--out", rep)
    assert r.returncode == 0, r.stderr
    checks = {}
    for how in ("computed", "reused"):
        extra = ["--reuse", rep / "eval_retrained.json"] if how == "reused" else []
        r = run_script("06_fuse.py", "--model", tiny_model, "--adapter-path", trained, "--save-path",
                       tmp_path / how / "fused", "--data", data_dir, "--out", tmp_path / how,
                       *extra)
        assert r.returncode == 0, r.stderr
        checks[how] = json.loads((tmp_path / how / "fuse_check.json").read_text())
    assert "reused from" in r.stdout and checks["reused"].pop("adapter_side_reused")
    assert not checks["computed"].pop("adapter_side_reused")
    assert checks["reused"] == checks["computed"]

    other = tmp_path / "other"  # an evaluation of other adapters must not be taken
    other.mkdir()
    for f in trained.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    weights = {k: v * 2 for k, v in mx.load(str(other / "adapters.safetensors")).items()}
    mx.save_safetensors(str(other / "adapters.safetensors"), weights)
    artifacts.write_checksums(other, "scripts/03_train.py")
    assert fuse.reusable_adapter_logits(rep / "eval_retrained.json", tiny_model, other,
                                               data_dir / "test.jsonl", True) is None
    assert fuse.reusable_adapter_logits(rep / "eval_retrained.json", tiny_model, trained,
                                               data_dir / "test.jsonl", True) is not None


def test_fuse_crash_leaves_the_previous_model(tmp_path, tiny_model, trained, data_dir, monkeypatch):
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "marker").write_text("previous good model")

    def crash(*args, **kwargs):
        raise RuntimeError("power cut in the middle of saving")

    monkeypatch.setattr("smslora.fuse.save", crash)
    with pytest.raises(RuntimeError):
        fuse_cmd.main(["--model", str(tiny_model), "--adapter-path", str(trained),
                          "--save-path", str(fused), "--data", str(data_dir),
                          "--out", str(tmp_path / "reports")])
    assert sorted(p.name for p in fused.iterdir()) == ["marker"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    fuse_cmd.main(["--model", str(tiny_model), "--adapter-path", str(trained),
                      "--save-path", str(fused), "--data", str(data_dir),
                      "--out", str(tmp_path / "reports")])
    assert (fused / "config.json").is_file() and not (fused / "marker").exists()


def test_evaluate_stress_chat_and_report(tmp_path, tiny_model, trained, data_dir):
    rep = tmp_path / "reports"
    for args in (["--name", "baseline"], ["--adapter-path", trained, "--name", "retrained"]):
        r = run_script("04_evaluate.py", "--model", tiny_model, "--data", data_dir, "--out", rep,
                       *args)
        assert r.returncode == 0, r.stderr
    ev = json.loads((rep / "eval_retrained.json").read_text())
    t = ev["test"]
    assert t["messages"] == 1031
    c = t["confusion"]
    assert c["tp"] + c["fn"] == 128 and c["fp"] + c["tn"] == 903
    assert t["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / 1031)
    assert t["threshold"] == json.loads((trained / "threshold.json").read_text())["threshold"]
    assert ev["fixed_messages"]["tokens"] > 10 * 20
    assert len(artifacts.read_jsonl(rep / "scores_retrained.jsonl")) == 1031

    r = run_script("05_stress_test.py", "--model", tiny_model, "--adapter-path", trained,
                   "--name", "fused", "--out", rep)
    assert r.returncode == 0, r.stderr
    stress = json.loads((rep / "stress_fused.json").read_text())
    assert stress["messages"] == 80
    boss = [x for x in stress["results"] if x["category"] == "final-boss"]
    assert len(boss) == 5 and all(x["verdict"] in ("spam", "ham") for x in boss)
    assert f"{stress['messages'] - stress['misses']}/80 correct" in r.stdout

    (rep / "train_history.json").write_bytes(
        (trained.parent / "reports" / "train_history.json").read_bytes())
    r = run_script("report.py", "--reports", rep)
    assert r.returncode == 0, r.stderr
    md = (rep / "report.md").read_text()
    assert "| baseline |" in md and "| retrained |" in md and "boss-5" in md
    held = json.loads((trained / "threshold.json").read_text())["held_out"]
    assert (f"(840 held-out messages, never trained on): accuracy {100 * held['accuracy']:.2f}%"
            in md and "of the 200 modern ones" in md)
    assert (rep / "scores_retrained.png").stat().st_size > 10_000 and "scores_retrained.png" in md

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "WIN a free prize, call now"}\n{"text": "see you at 6"}\n'
                   '{"text": "🎉🎉"}\n{"text": "' + "very long message " * 2000 + '"}\n')
    out = tmp_path / "out.jsonl"
    r = run_script("07_chat.py", "--model", tiny_model, "--adapter-path", trained,
                   "--input", src, "--output", out)
    assert r.returncode == 0, r.stderr
    rows = artifacts.read_jsonl(out)
    assert [x["text"][:12] for x in rows] == ["WIN a free p", "see you at 6", "🎉🎉", "very long me"]
    assert all(x["label"] in ("spam", "ham") and 0 <= x["p_spam"] <= 1 for x in rows)

    r = run_script("07_chat.py", "--model", tiny_model, input="WIN a prize\nhello\n\n")
    assert r.returncode == 0 and r.stdout.count("P(spam)=") == 2

    # --threshold replaces the stored one: 0 calls every message spam, 1 none
    for threshold, label in (("0", "spam"), ("1", "ham")):
        r = run_script("07_chat.py", "--model", tiny_model, "--adapter-path", trained,
                       "--input", src, "--output", out, "--threshold", threshold)
        assert r.returncode == 0, r.stderr
        assert [x["label"] for x in artifacts.read_jsonl(out)] == [label] * 4


def test_long_message_is_truncated_never_the_prompt(tiny_model):
    _, tok = load_model(tiny_model)
    ids = scoring.encode_prompt(tok, "spam spam lovely spam " * 500, max_tokens=100)
    assert len(ids) <= 100
    assert tok.decode(ids).endswith("\nClassification:")
    assert tok.decode(ids).startswith("Classify the following SMS message as spam or not spam.")
    # a megabyte line: only its first characters reach the tokenizer, and the ids are the same
    seen = []

    class Spy:
        def encode(self, text):
            seen.append(len(text))
            return tok.encode(text)

        decode = staticmethod(tok.decode)

    huge = "spam spam lovely spam " * 50_000
    assert scoring.encode_prompt(Spy(), huge, max_tokens=100) == ids
    assert max(seen) <= task.CHARS_PER_TOKEN * 100 + len(task.format_prompt(""))


@pytest.mark.parametrize("args,needle", [
    (["04_evaluate.py", "--model", "{tmp}/missing"], "01_download_model.py"),
    (["04_evaluate.py", "--model", "{tiny}", "--adapter-path", "{tmp}/none"], "03_train.py"),
    (["04_evaluate.py", "--model", "{tiny}", "--data", "{tmp}"], "02_prepare_data.py"),
    (["06_fuse.py", "--model", "{tiny}", "--adapter-path", "{tmp}/none", "--save-path",
      "{tmp}/fused"], "03_train.py"),
    (["05_stress_test.py", "--model", "{tmp}/missing"], "01_download_model.py"),
    (["07_chat.py", "--model", "{tiny}", "--input", "{tmp}/none.jsonl", "--output", "{tmp}/o"],
     "not found"),
    (["07_chat.py", "--model", "{tiny}", "--input", "{tmp}/bad.jsonl", "--output", "{tmp}/o"],
     "line 2"),
    (["07_chat.py", "--model", "{tiny}", "--input", "{tmp}/latin1.txt", "--output", "{tmp}/o"],
     "UTF-8"),
    (["07_chat.py", "--model", "{tiny}", "--input", "{tmp}/empty.csv", "--output", "{tmp}/o"],
     "line 3: empty message"),
    (["07_chat.py", "--model", "{tmp}/garbage"], "cannot load"),
])
def test_bad_input_one_line_exit_2(tmp_path, tiny_model, args, needle):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "empty.csv").write_text("text\nhello\n   \n")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"not a safetensors file")
    args = [a.format(tmp=tmp_path, tiny=tiny_model) for a in args]
    r = run_script(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert needle in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "fused").exists()


def test_shared_prefix_cache_gives_the_same_scores(tiny_model, data_dir, monkeypatch):
    model, tok = load_model(tiny_model)
    messages = [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:50]]
    assert all(scoring.encode_prompt(tok, m)[:14] == scoring.prompt_prefix_ids(tok) for m in messages)
    cached = scoring.score_logits(model, tok, messages, batch_size=16)
    monkeypatch.setattr("smslora.scoring.prompt_prefix_ids", lambda tok: [-1])  # no shared prefix
    full = scoring.score_logits(model, tok, messages, batch_size=16)
    np.testing.assert_allclose(cached, full, atol=1e-4)
    single = scoring.score_logits(model, tok, messages[:5], batch_size=1)
    np.testing.assert_allclose(single, full[:5], atol=1e-4)  # padding never leaks into a score


def test_the_openings_keys_are_computed_again_only_when_the_weights_change(tiny_model, data_dir):
    from mlx.utils import tree_flatten

    model, tok = load_model(tiny_model)
    messages = [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:8]]
    prefix = scoring.prompt_prefix_ids(tok)
    before = scoring.score_logits(model, tok, messages)
    assert scoring._prefix_cache(model, prefix) is scoring._prefix_cache(model, prefix)
    assert not any("opening" in k for k, _ in tree_flatten(model.parameters()))  # never saved
    norm = model.layers[0].input_layernorm
    norm.weight = norm.weight * 3  # new weights in the same model object
    after = scoring.score_logits(model, tok, messages)
    fresh, _ = load_model(tiny_model)
    fresh.layers[0].input_layernorm.weight = fresh.layers[0].input_layernorm.weight * 3
    np.testing.assert_allclose(after, scoring.score_logits(fresh, tok, messages), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3


def test_bulk_scoring_resumes_an_interrupted_output(tmp_path, tiny_model):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"message number {i}\n" for i in range(7)))
    out = tmp_path / "out.jsonl"
    # what an interrupted run leaves: two complete lines (sentinel scores) and a cut-off third
    (tmp_path / "out.jsonl.partial").write_text(
        '{"text": "message number 0", "label": "ham", "p_spam": 0.123456}\n'
        '{"text": "message number 1", "label": "ham", "p_spam": 0.123456}\n{"text": "mess')
    r = run_script("07_chat.py", "--model", tiny_model, "--input", src, "--output", out)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "7/7" in r.stderr
    rows = artifacts.read_jsonl(out)
    assert [x["text"] for x in rows] == [f"message number {i}" for i in range(7)]
    assert [x["p_spam"] for x in rows[:2]] == [0.123456, 0.123456]  # kept, not re-scored
    assert rows[2]["p_spam"] != 0.123456
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_one_process_pipeline_writes_what_separate_processes_write(tmp_path, tiny_model,
                                                                   data_dir):
    """The pipeline (runme.sh's way) calls each step's package function in one process: the
    same artifacts as running the numbered scripts one by one, nothing carried from one step to
    the next."""
    from smslora import evaluate, finetune
    from smslora.config import load_config

    outputs = {}
    for how in ("processes", "one-process"):
        out = tmp_path / how
        flags = {"model": str(tiny_model), "data": str(data_dir),
                 "adapter_path": str(out / "adapters"), "iters": 6, "num_layers": 2}
        steps = [
            Step("eval-base", "04_evaluate.py", lambda: evaluate.run(
                tiny_model, None, data_dir, "baseline", out / "reports")),
            Step("train", "03_train.py", lambda: finetune.run(
                load_config("default", flags), out / "reports")),
            Step("eval-lora", "04_evaluate.py", lambda: evaluate.run(
                tiny_model, out / "adapters", data_dir, "retrained", out / "reports")),
        ]
        if how == "processes":
            for args in (["04_evaluate.py", "--model", tiny_model, "--data", data_dir,
                          "--name", "baseline", "--out", out / "reports"],
                         ["03_train.py", "--model", tiny_model, "--data", data_dir,
                          "--adapter-path", out / "adapters", "--reports", out / "reports",
                          "--iters", "6", "--num-layers", "2"],
                         ["04_evaluate.py", "--model", tiny_model, "--adapter-path",
                          out / "adapters", "--data", data_dir, "--name", "retrained", "--out",
                          out / "reports"]):
                r = run_script(*args)
                assert r.returncode == 0, r.stderr
        else:
            assert run_steps(steps, tmp_path / "timings.tsv") == 0
        outputs[how] = {
            "adapter": {k: np.array(v) for k, v in
                        mx.load(str(out / "adapters" / "adapters.safetensors")).items()},
            "threshold": json.loads((out / "adapters" / "threshold.json").read_text()),
            **{name: [r["p_spam"] for r in
                      artifacts.read_jsonl(out / "reports" / f"scores_{name}.jsonl")]
               for name in ("baseline", "retrained")}}
    a, b = outputs["processes"], outputs["one-process"]
    assert a["adapter"].keys() == b["adapter"].keys()
    for k in a["adapter"]:
        np.testing.assert_array_equal(a["adapter"][k], b["adapter"][k])
    assert a["threshold"] == b["threshold"]
    assert a["baseline"] == b["baseline"] and a["retrained"] == b["retrained"]
    names = [line.split("\t")[0] for line in (tmp_path / "timings.tsv").read_text().splitlines()]
    assert names == ["eval-base", "train", "eval-lora"]


def test_pipeline_steps_are_the_commands_they_show():
    """runme.sh's steps, each shown as the command line that runs it alone, in order."""
    steps = default_steps()
    assert [s.name for s in steps] == ["download", "prepare", "eval-base", "stress-base",
                                       "train", "baselines", "eval-lora", "fuse", "stress-fused"]
    assert steps[4].command == "03_train.py"  # the base model's own recipe
    assert default_steps("seed", resume=True)[4].command == "03_train.py --config seed --resume"
    assert steps[7].command == "06_fuse.py --reuse reports/eval_retrained.json"


@pytest.mark.parametrize("source, want", [
    ({"base": "gemma3-270m"}, "gemma3-270m"),  # a registered base with a recipe of its own
    ({"base": "smollm2-135m"}, "default"),  # SmolLM2's recipe is default.yaml
    ({"base": "../default"}, "default"),  # a name is never a path
    ({"source": "hub"}, "default"),
    (None, "default"),  # no source.json
    ("[not json", "default"),
])
def test_training_uses_the_base_models_own_recipe_unless_told(tmp_path, source, want):
    from smslora.config import default_config_name

    if source is not None:
        text = source if isinstance(source, str) else json.dumps(source)
        (tmp_path / "source.json").write_text(text)
    assert default_config_name(tmp_path) == want


def test_one_process_pipeline_stops_at_the_first_failing_step(tmp_path, tiny_model, data_dir,
                                                              capsys):
    from smslora import evaluate, splits

    steps = [Step("eval-base", "04_evaluate.py", lambda: evaluate.run(
                 tiny_model, None, tmp_path / "no-data", "baseline", tmp_path)),
             Step("prepare", "02_prepare_data.py", lambda: splits.run(
                 "shipped", tmp_path / "never"))]
    assert run_steps(steps, tmp_path / "timings.tsv") == 2
    err = capsys.readouterr().err
    assert "error: test.jsonl not found" in err and "eval-base failed" in err
    assert not (tmp_path / "never").exists() and not (tmp_path / "timings.tsv").exists()


def test_tfidf_baselines_train_on_the_adapters_rows_and_score_every_evaluation_set(tmp_path,
                                                                                   data_dir):
    """04 --tfidf: the classic filters, trained on the rows the adapters name, scored on the test
    split, the held-out sets and the stress suite; the training file changes what they learn."""
    results = {}
    for train_file in ("train_all.jsonl", "train.jsonl"):
        out = tmp_path / train_file
        out.mkdir()
        results[train_file] = {r["name"]: r for r in
                               baselines.tfidf_baselines(data_dir, train_file, out)}
        assert sorted(p.name for p in out.iterdir()) == ["eval_tfidf-logreg.json",
                                                         "eval_tfidf-svm.json"]
    for r in results["train_all.jsonl"].values():
        assert r["train_file"] == "train_all.jsonl" and r["stress_messages"] == 70
        assert r["test"]["messages"] == 1031 and r["test"]["confusion"]["tp"] + \
            r["test"]["confusion"]["fn"] == 128
        assert r["held_out"]["collection"]["messages"] == 640
        assert r["held_out"]["modern"]["messages"] == 200
        assert r["test"]["accuracy"] > 0.97 and r["test"]["roc_auc"] > 0.99  # a real filter
    # 800 balanced rows instead of 4,088 at the natural ratio: another model, more false alarms
    for name in ("tfidf-logreg", "tfidf-svm"):
        a, b = results["train_all.jsonl"][name]["test"], results["train.jsonl"][name]["test"]
        assert a["confusion"] != b["confusion"]
        assert b["ham_false_positive_rate"] > a["ham_false_positive_rate"]


def test_scoring_batches_trade_padding_against_passes():
    """Scoring splits length-sorted messages where padding would cost more than a pass of its
    own (scoring.PASS_TOKENS), within the same limits as the greedy batches training uses."""
    lengths = [1] * 8 + [40]
    greedy = [list(b) for b in scoring.length_batches(lengths, 64)]
    assert greedy == [list(range(9))]  # one batch: 9 x 40 padded positions
    cheapest = [list(b) for b in scoring.length_batches(lengths, 64, pass_tokens=32)]
    assert cheapest == [list(range(8)), [8]]  # 32 + 8 + 32 + 40 < 32 + 360
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 250, 300).tolist()
    for size, budget in ((64, 1024), (8, 512), (1, 1024)):
        batches = list(scoring.length_batches(lengths, size, budget, pass_tokens=32))
        assert sorted(i for b in batches for i in b) == list(range(300))
        assert all(len(b) <= size and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget)
                   for b in batches)
        def cost(bs): return sum(32 + len(b) * max(lengths[i] for i in b) for b in bs)
        assert cost(batches) <= cost(list(scoring.length_batches(lengths, size, budget)))


def test_probe_learns_from_the_hidden_state_the_label_logits_come_from(tmp_path, tiny_model,
                                                                      data_dir):
    """04 --probe: logistic regression on the base model's final hidden state at the prompt's
    last position (the very vector the two label logits are read from), trained on the rows
    the adapters name, scored like the other baselines, its C chosen on the held-out sets."""
    from smslora import probe
    from smslora.model import load_model

    model, tokenizer = load_model(tiny_model)
    messages = [r["message"] for r in artifacts.read_jsonl(data_dir / "test.jsonl")[:24]]
    h = scoring.features(model, tokenizer, messages)
    assert h.shape == (24, model.args.hidden_size)
    pair = scoring.label_pair(tokenizer)
    np.testing.assert_allclose(
        np.array(scoring.label_logits(model, mx.array(h), pair)),
        scoring.score_logits(model, tokenizer, messages), atol=1e-4)

    adapters = tmp_path / "adapters"  # only its training file matters to the probe
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps({"train_file": "train.jsonl"}))
    r = run_script("04_evaluate.py", "--probe", "--model", tiny_model, "--adapter-path",
                   adapters, "--data", data_dir, "--out", tmp_path / "reports")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "reports" / f"eval_{probe.probe_name(tiny_model)}.json")
                        .read_text())
    assert report["train_file"] == "train.jsonl" and report["C"] in probe.C_GRID
    assert report["features"] == model.args.hidden_size and report["stress_messages"] == 70
    assert report["test"]["messages"] == 1031
    held = report["held_out"]
    assert (held["collection"]["messages"], held["modern"]["messages"]) == (640, 200)
    fp = sum(h["wrong"]["ham_flagged"] for h in held.values())
    fn = sum(h["wrong"]["spam_missed"] for h in held.values())
    assert (report["valid_false_positives"], report["valid_false_negatives"]) == (fp, fn)
    assert report["cost"] == pytest.approx(report["ham_weight"] * fp + fn)
    assert held["collection"]["threshold"] == report["test"]["threshold"]  # one threshold
    assert f"[{report['name']}] trained on train.jsonl" in r.stdout

    r = run_script("04_evaluate.py", "--probe", "--tfidf", "--out", tmp_path / "both")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
    assert not (tmp_path / "both").exists()

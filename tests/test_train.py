"""Step 3: LoRA on the real architecture's shape, the config, the loop, the threshold."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama

import tiny
from conftest import run_script
from smslora import artifacts, errors, finetune, metrics, scoring, trainer
from smslora.commands import train as train_cmd
from smslora.batches import balanced_batch_at, batch_at, collate, padded, tokenize
from smslora.config import TrainConfig, load_config
from smslora.frozen import FrozenStates, blocks_to_recompute, cached_label_logits, opening_shared, release_blocks
from smslora.model import load_model
from smslora.threshold import choose_threshold



def test_trainable_parameters_of_smollm2_135m_are_the_tutorials():
    """1,302,528 = 16 layers x rank 8 x (q 576+576, k 576+192, v 576+192, o 576+576,
    gate/up/down 3 x (576+1536)): the tutorial's "1.303M/134.515M"."""
    model = llama.Model(llama.ModelArgs.from_dict(tiny.SMOLLM2_135M))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert total == 134_515_008
    cfg = load_config("seed", {})
    assert finetune.add_lora(model, cfg) == 1_302_528


def test_shipped_configs_parse():
    seed = load_config("seed", {})
    assert (seed.num_layers, seed.lora_rank, seed.lora_scale, seed.batch_size, seed.iters,
            seed.learning_rate, seed.steps_per_eval, seed.val_batches, seed.loss) == \
        (16, 8, 20.0, 4, 400, 5e-5, 50, 10, "all")
    default = load_config("default", {})
    assert default.loss == "completion"
    assert load_config("seed", {"iters": 7}).iters == 7  # flags override the file


@pytest.mark.parametrize("yaml_text,needle", [
    ("iters: 10\nbogus: 1\n", "unknown config key(s): bogus"),
    ("iters: ten\n", "iters: expected int"),
    ("iters: -1\n", "iters must be positive"),
    ("loss: everything\n", "loss must be"),
    ("- a\n- b\n", "expected a mapping"),
    ("iters: [\n", "not valid YAML"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, yaml_text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    r = run_script("03_train.py", "--config", path, "--adapter-path", tmp_path / "ad")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ad").exists()


def test_training_before_data_is_prepared_names_the_step(tmp_path, tiny_model):
    r = run_script("03_train.py", "--model", tiny_model, "--data", tmp_path / "nothing",
                   "--adapter-path", tmp_path / "ad")
    assert r.returncode == 2 and "02_prepare_data.py" in r.stderr
    r = run_script("03_train.py", "--model", tmp_path / "no-model", "--data", tmp_path / "nothing",
                   "--adapter-path", tmp_path / "ad")
    assert r.returncode == 2 and "01_download_model.py" in r.stderr


def test_batch_order_is_a_pure_function_of_step_and_seed():
    batches = [[i] for i in range(10)]
    first = [batch_at(s, batches, 42) for s in range(25)]
    assert first == [batch_at(s, batches, 42) for s in range(25)]
    assert sorted(b[0] for b in first[:10]) == list(range(10))  # each epoch sees every batch
    assert first != [batch_at(s, batches, 7) for s in range(25)]


def test_completion_loss_only_counts_the_label_tokens(tiny_model):
    model, tok = load_model(tiny_model)
    rows = [{"message": "WIN a prize now", "label": "spam"}, {"message": "ok see you", "label": "ham"}]
    ex = tokenize(tok, rows, 64)
    labels = scoring.label_token_ids(tok)
    _, n_completion = trainer.loss_fn(model, *collate(ex, [0, 1]), True)
    _, n_all = trainer.loss_fn(model, *collate(ex, [0, 1]), False)
    # label tokens + EOS per message; every next-token position for "all"
    assert n_completion.item() == len(labels["spam"]) + len(labels["ham"]) + 2
    assert n_all.item() == sum(len(ids) - 1 for ids, _ in ex)


@pytest.mark.parametrize("completion_only,remat,share", [
    (True, None, False), (False, None, False), (False, "all", False),
    (True, None, True), (False, None, True), (True, "all", True), (False, "some", True)])
def test_frozen_states_give_the_loss_and_gradients_of_the_full_pass(tmp_path, monkeypatch,
                                                                    completion_only, remat, share):
    """Starting the forward pass at the first LoRA block from cached states changes nothing;
    nor does recomputing all or some of the blocks in the backward pass (mx.checkpoint, for long
    batches); nor does computing the prompt's opening once for the whole batch (share)."""
    path = tiny.make_tiny_model(tmp_path / "m", num_hidden_layers=4)
    model, tok = load_model(path)
    cfg = TrainConfig(num_layers=2, seed=1)
    finetune.add_lora(model, cfg)
    for name, p in tree_flatten(model.trainable_parameters()):  # non-zero B: a live adapter
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.1)]))
    rows = [{"message": m, "label": l} for m, l in [("WIN a prize now!!", "spam"), ("ok", "ham"),
            ("see you at the station at six then", "ham"), ("Claim your reward", "spam")]]
    ex = tokenize(tok, rows, 64)
    frozen = FrozenStates(model, ex, first=2, budget=40)  # batches of another composition
    idx = [2, 0, 3]
    vg = nn.value_and_grad(model, trainer.loss_fn)
    (plain, n1), g1 = vg(model, *collate(ex, idx), completion_only)
    shared = frozen.shared if share else 0
    assert frozen.shared == len(scoring.prompt_prefix_ids(tok))  # "...\nMessage:"
    positions = len(idx) * (collate(ex, idx)[0].shape[1] - 1 - shared)
    if remat:  # every block, or one of the two (what is kept: half the positions)
        keep = 0 if remat == "all" else (positions + 1) // 2
        monkeypatch.setattr("smslora.frozen.CHECKPOINT_TOKENS", keep)
    assert blocks_to_recompute(positions, 2) == {None: 0, "all": 2, "some": 1}[remat]
    (cached, n2), g2 = vg(model, *collate(ex, idx, frozen), completion_only, 2, shared)
    assert n1.item() == n2.item() and abs(plain.item() - cached.item()) < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4), k
    # the validation P(spam) that picks the threshold, from the same states
    p_cached = scoring.p_spam_of(cached_label_logits(model, tok, ex, frozen))
    assert np.allclose(p_cached, scoring.p_spam(model, tok, [r["message"] for r in rows]), atol=1e-5)
    release_blocks(model, 2)  # and nothing below the LoRA blocks is needed any more
    assert np.allclose(scoring.p_spam_of(cached_label_logits(model, tok, ex, frozen)), p_cached)
    assert model.layers[0].mlp.up_proj.weight.size == 0


def test_long_batches_recompute_only_as_many_blocks_as_memory_needs(monkeypatch):
    monkeypatch.setattr("smslora.frozen.CHECKPOINT_TOKENS", 256)
    assert [blocks_to_recompute(p, 16) for p in (100, 256, 257, 284, 512, 1024)] == \
        [0, 0, 1, 2, 8, 12]
    assert blocks_to_recompute(10**9, 16) == 16
    monkeypatch.setattr("smslora.frozen.on_cpu", lambda: False)  # a GPU keeps far longer batches
    assert blocks_to_recompute(1024, 16) == 0 < blocks_to_recompute(10**9, 16)


def test_compiled_update_is_the_optimizers_own_bit_for_bit(tiny_model):
    import mlx.optimizers as optim

    results = []
    for compiled in (False, True):
        model, _ = load_model(tiny_model)
        finetune.add_lora(model, TrainConfig(num_layers=2, seed=1))
        optimizer = optim.Adam(learning_rate=optim.cosine_decay(1e-2, 5, 1e-3))
        optimizer.init(model.trainable_parameters())
        update = trainer.compiled_update(model, optimizer) if compiled else \
            (lambda grads: optimizer.update(model, grads))
        mx.random.seed(0)
        for _ in range(4):  # the schedule, the step count and both moments go through it
            grads = {k: mx.random.normal(v.shape) for k, v in
                     tree_flatten(model.trainable_parameters())}
            update(tree_unflatten(list(grads.items())))
            mx.eval(model.parameters(), optimizer.state)
        results.append(dict(tree_flatten(model.trainable_parameters())))
    assert results[0].keys() == results[1].keys()
    assert all(mx.array_equal(results[0][k], results[1][k]).item() for k in results[0])
    assert any(k.endswith("lora_b") and mx.abs(v).max().item() > 0 for k, v in results[1].items())


@pytest.mark.parametrize("layers", [1, 2])  # from frozen states (block 0 frozen), from ids
def test_the_whole_step_compiled_trains_as_the_plain_step(tmp_path, tiny_model, data_dir,
                                                          monkeypatch, layers):
    """A GPU's step (one compiled function on batches padded to 32 positions), forced here on a
    CPU: the same adapter as the step run operation by operation."""
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr("smslora.trainer.compile_whole_step", lambda: compiled)
        ad = tmp_path / f"adapters{int(compiled)}"
        train_cmd.main(["--config", "default", "--model", str(tiny_model), "--data", str(data_dir),
                    "--adapter-path", str(ad), "--reports", str(tmp_path / f"r{int(compiled)}"),
                    "--iters", "12", "--num-layers", str(layers), "--steps-per-eval", "6"])
        runs[compiled] = (mx.load(str(ad / "final_adapters.safetensors")),
                          json.loads((ad / "history.json").read_text()))
    (plain, h0), (fused, h1) = runs[False], runs[True]
    for k in plain:
        assert mx.allclose(plain[k], fused[k], atol=1e-5, rtol=1e-4), k
    assert [e["train_loss"] for e in h0["train"]] == pytest.approx(
        [e["train_loss"] for e in h1["train"]], rel=1e-4)
    assert any(mx.abs(v).max().item() > 0 for k, v in fused.items() if k.endswith("lora_b"))


def test_a_gpu_runs_the_opening_in_every_row_and_trains_the_same_adapter(tmp_path, tiny_model,
                                                                         data_dir, monkeypatch):
    """On a GPU the LoRA blocks run each row's copy of the prompt's opening (fewer operations);
    on a CPU the opening once a batch (fewer positions): the same adapter either way."""
    frozen = type("States", (), {"shared": 15})()
    assert opening_shared(frozen) == 15
    monkeypatch.setattr("smslora.frozen.on_cpu", lambda: False)
    assert opening_shared(frozen) == 0
    monkeypatch.undo()
    runs, calls = [], []
    for rows in (False, True):
        if rows:
            monkeypatch.setattr("smslora.finetune.opening_shared", lambda frozen: calls.append(1) or 0)
        ad = tmp_path / f"adapters{int(rows)}"
        train_cmd.main(["--config", "default", "--model", str(tiny_model), "--data", str(data_dir),
                    "--adapter-path", str(ad), "--reports", str(tmp_path / f"r{int(rows)}"),
                    "--iters", "12", "--num-layers", "1", "--steps-per-eval", "6"])
        runs.append((mx.load(str(ad / "final_adapters.safetensors")),
                     json.loads((ad / "history.json").read_text())))
    (once, h0), (every, h1) = runs
    assert calls  # the steps and validations of the second run took the rows' way
    for k in once:
        assert mx.allclose(once[k], every[k], atol=1e-5, rtol=1e-4), k
    assert [e["val_loss"] for e in h0["val"]] == pytest.approx(
        [e["val_loss"] for e in h1["val"]], rel=1e-4)
    assert any(mx.abs(v).max().item() > 0 for k, v in every.items() if k.endswith("lora_b"))


def test_the_compiled_step_is_off_unless_the_environment_asks(monkeypatch):
    monkeypatch.delenv("SMS_LORA_COMPILE_STEP", raising=False)
    assert trainer.compile_whole_step() is False
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("SMS_LORA_COMPILE_STEP", value)
        assert trainer.compile_whole_step() is want
    monkeypatch.setenv("SMS_LORA_COMPILE_STEP", "yes")
    with pytest.raises(errors.UserError, match="SMS_LORA_COMPILE_STEP='yes'"):
        trainer.compile_whole_step()


def test_a_compiled_steps_dropout_noise_comes_from_the_step_seed(tiny_model, monkeypatch):
    import mlx.optimizers as optim

    monkeypatch.setattr("smslora.trainer.compile_whole_step", lambda: True)
    model, tok = load_model(tiny_model)
    finetune.add_lora(model, TrainConfig(num_layers=2, lora_dropout=0.5))
    model.train()  # dropout on, as in 03_train's steps
    for name, p in tree_flatten(model.trainable_parameters()):  # non-zero B: the noise shows
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.1)]))
    optimizer = optim.Adam(learning_rate=0.0)  # the weights stay: only the noise differs
    optimizer.init(model.trainable_parameters())
    vg = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, False))
    step = trainer.training_step(model, optimizer, vg)
    ex = tokenize(tok, [{"message": "WIN a prize now!!", "label": "spam"}], 64)
    losses = []
    for seed in (1, 2, 1):  # 03_train seeds every step
        mx.random.seed(seed)
        losses.append(step(*collate(ex, [0]))[0].item())
    assert losses[0] == losses[2] != losses[1]


def test_padding_a_batch_changes_no_loss(tiny_model):
    model, tok = load_model(tiny_model)
    rows = [{"message": m, "label": l} for m, l in [("WIN a prize now!!", "spam"), ("ok", "ham")]]
    ex = tokenize(tok, rows, 64)
    batch = collate(ex, [0, 1])
    wide = padded(batch, 32)
    assert wide[0].shape[1] % 32 == 0 and wide[0].shape[1] > batch[0].shape[1]
    for completion_only in (True, False):
        a, n = trainer.loss_fn(model, *batch, completion_only)
        b, m = trainer.loss_fn(model, *wide, completion_only)
        assert n.item() == m.item() and abs(a.item() - b.item()) < 1e-6


def test_choose_threshold_prefers_few_false_alarms():
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    is_spam = np.array([False, False, False, True, True, True])
    t = choose_threshold(p, is_spam, ham_weight=7.0)
    assert 0.6 < t["threshold"] < 0.7
    assert t["valid_false_positives"] == 0 and t["valid_false_negatives"] == 0
    # a spam scored below a ham: with ham weighted 7x the cut goes above the ham
    p = np.array([0.1, 0.5, 0.4, 0.9])
    is_spam = np.array([False, False, True, True])
    t = choose_threshold(p, is_spam, ham_weight=7.0)
    assert 0.5 < t["threshold"] < 0.9 and t["valid_false_negatives"] == 1


def test_train_writes_the_adapter_folder(tmp_path, tiny_model, data_dir):
    ad, rep = tmp_path / "adapters", tmp_path / "reports"
    r = run_script("03_train.py", "--config", "seed", "--model", tiny_model, "--data", data_dir,
                   "--adapter-path", ad, "--reports", rep, "--iters", "12", "--num-layers", "2",
                   "--steps-per-eval", "5", "--steps-per-save", "6", "--steps-per-report", "4")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ad.iterdir()) == [
        "0000006_adapters.safetensors", "0000012_adapters.safetensors", "adapter_config.json",
        "adapters.safetensors", "best_adapters.safetensors", "checksums.json",
        "final_adapters.safetensors", "history.json", "threshold.json"]
    assert sorted(p.name for p in rep.iterdir()) == ["loss_curve.png", "train_history.json"]
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"Iter 1: Val loss \d+\.\d{3}, Val took \d+\.\d{3}s", lines[2])
    assert [int(l.split(":")[0].split()[1]) for l in lines if "Val loss" in l] == [1, 5, 10, 12]
    assert [int(l.split(":")[0].split()[1]) for l in lines if "Train loss" in l] == [4, 8, 12]
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    # the shipped (final) adapter is what mlx-lm loads
    assert mx.array_equal(mx.load(str(ad / "adapters.safetensors"))["model.layers.1.mlp.up_proj.lora_b"],
                          mx.load(str(ad / "final_adapters.safetensors"))["model.layers.1.mlp.up_proj.lora_b"])
    from mlx_lm import load
    load(str(tiny_model), adapter_path=str(ad))
    # the threshold is chosen on valid + calibration (560 ham, 80 spam: the natural ratio) +
    # valid_modern (100 + 100), ham weighted up to the natural ratio, and the figures recorded for
    # it are those of the shipped adapter on those messages
    t = json.loads((ad / "threshold.json").read_text())
    assert t["chosen_on"] == "valid.jsonl + calibration.jsonl + valid_modern.jsonl"
    assert abs(t["ham_weight"] - (903 / 128) / (660 / 180)) < 1e-9
    rows = [r for f in ("valid", "calibration", "valid_modern")
            for r in artifacts.read_jsonl(data_dir / f"{f}.jsonl")]
    p = scoring.p_spam(*load_model(tiny_model, ad), [r["message"] for r in rows])
    is_spam = np.array([r["label"] == "spam" for r in rows])
    want = metrics.classifier_metrics(is_spam, p, t["threshold"])
    assert t["held_out"]["messages"] == 840 and t["held_out"]["confusion"] == want["confusion"]
    assert abs(t["held_out"]["roc_auc"] - want["roc_auc"]) < 1e-3
    modern = metrics.classifier_metrics(is_spam[-200:], p[-200:], t["threshold"])
    assert t["held_out"]["modern"]["confusion"] == modern["confusion"]
    assert t["held_out"]["collection"]["messages"] == 640


def test_supplement_repeats_weighs_the_modern_messages(tmp_path, tiny_model, data_dir):
    """train_all.jsonl: 3,488 collection + 600 supplement rows; with 3 repeats each supplement
    message is in the training rows three times."""
    r = run_script("03_train.py", "--model", tiny_model, "--data", data_dir, "--adapter-path",
                   tmp_path / "ad", "--reports", tmp_path / "rep", "--iters", "2",
                   "--num-layers", "2", "--train-file", "train_all.jsonl",
                   "--supplement-repeats", "3")
    assert r.returncode == 0, r.stderr
    assert "Training: 5288 messages" in r.stdout  # 4,088 + 2 x 600
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["supplement_repeats"] == 3


def test_same_seed_same_adapter(tmp_path, tiny_model, data_dir):
    outs = []
    for name in ("a", "b"):
        r = run_script("03_train.py", "--model", tiny_model, "--data", data_dir, "--adapter-path",
                       tmp_path / name, "--reports", tmp_path / f"rep{name}", "--iters", "6",
                       "--num-layers", "2", "--ship", "final")
        assert r.returncode == 0, r.stderr
        outs.append(mx.load(str(tmp_path / name / "adapters.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert mx.array_equal(outs[0][k], outs[1][k]), k


def test_balanced_batches_are_half_each_class_and_deterministic():
    by_class = [[0, 1, 2], list(range(3, 20))]
    batches = [balanced_batch_at(s, by_class, 4, 42) for s in range(12)]
    assert all(sum(i < 3 for i in b) == 2 for b in batches)
    assert batches == [balanced_batch_at(s, by_class, 4, 42) for s in range(12)]
    seen_spam = [i for b in batches[:3] for i in b if i < 3]
    assert sorted(seen_spam[:3]) == [0, 1, 2]  # a class is cycled in full before repeating


@pytest.mark.parametrize("blowup,needle", [
    (float("nan"), "loss exploded to nan at iteration"),
    (1000.0, "the running median"),  # finite, but 1000x the running loss for 3 steps
])
def test_loss_explosion_stops_with_a_diagnosis_and_a_loadable_last_good_adapter(
        tmp_path, tiny_model, data_dir, monkeypatch, capsys, blowup, needle):
    real_loss, calls = trainer.loss_fn, []

    def exploding_loss(*args, **kwargs):  # fine for 20 steps, then NaN or huge, as a too-high
        loss, n = real_loss(*args, **kwargs)  # learning rate does
        calls.append(1)
        return (loss * blowup if len(calls) > 20 else loss), n

    monkeypatch.setattr("smslora.finetune.loss_fn", exploding_loss)
    ad = tmp_path / "adapters"
    with pytest.raises(SystemExit) as exit_info:
        train_cmd.main(["--config", "seed", "--model", str(tiny_model), "--data", str(data_dir),
                    "--adapter-path", str(ad), "--reports", str(tmp_path / "rep"),
                    "--iters", "40", "--num-layers", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert needle in err and "halving the learning rate" in err
    assert not ad.exists()  # nothing shipped
    good = tmp_path / ".adapters.partial" / "best_adapters.safetensors"
    assert str(good) in err
    weights = mx.load(str(good))
    assert weights and all(bool(mx.isfinite(v).all()) for v in weights.values())


def test_overfitting_is_reported_and_early_stopping_stops(tmp_path, tiny_model, data_dir,
                                                          monkeypatch, capsys):
    rising = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    monkeypatch.setattr("smslora.finetune.evaluate_loss", lambda *a: next(rising))
    train_cmd.main(["--config", "seed", "--model", str(tiny_model), "--data", str(data_dir),
                "--adapter-path", str(tmp_path / "ad"), "--reports", str(tmp_path / "rep"),
                "--iters", "30", "--num-layers", "2", "--steps-per-eval", "5",
                "--early-stopping", "3", "--ship", "best"])
    out = capsys.readouterr().out
    assert "overfitting" in out and "Early stop at iteration 20" in out
    history = json.loads((tmp_path / "ad" / "history.json").read_text())
    assert history["diagnosis"][:2] == ["overfitting", "early-stopped"]  # (+ collapse: tiny model)
    assert history["best"]["iteration"] == 5 and history["iterations_run"] == 20

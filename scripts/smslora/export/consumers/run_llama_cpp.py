"""Run by smslora/export/check.py with the Python of the llama.cpp environment (.venv-llama:
llama-cpp-python), never imported by the project: an exported GGUF as llama.cpp itself reads,
tokenizes and evaluates it.

Reads a JSON request on stdin: {"gguf": PATH, "texts": [...], "eval_ids": [[...], ...],
"label_ids": [spam, ham], "threads": n, "repack": false}; writes one JSON line: {"ids": llama.cpp's tokens of
each text (special tokens parsed; BOS and EOS added where the file says so, as the model's own
tokenizer adds them: Gemma's BOS),
"logits": [[spam, ham], ...] at the last position of each eval_ids, "seconds": the evaluation's
wall time, "add_bos": what the file tells llama.cpp}.

The prompt's shared opening is evaluated once and kept in the KV cache: each message then costs
only its own tokens, as llama.cpp's server does with its prompt cache. The sliding-window layers
(Gemma 3) keep every position (swa_full) so that the cache can go back to that opening.
"""

import json
import os
import sys
import time


def common_prefix(seqs):
    """Length of the opening every sequence shares (each keeps at least one token of its own)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        while n > 0 and s[:n] != first[:n]:
            n -= 1
    return max(n, 0)


def without_repacking(llama_cpp) -> None:
    """Load weights as stored (llama.cpp's --no-repack): llama-cpp-python 0.3.36's build crashes
    evaluating any quantized file (its own Q8_0 and Q4_1 files too) on a CPU with AMX when it
    repacks the weights for it."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def main() -> None:
    # On a busy CPU llama.cpp's OpenMP threads spin waiting for each other, and 2 threads on 2
    # shared cores ran 30x slower than 1; waiting passively costs little when the CPU is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp
    import numpy as np

    req = json.loads(sys.stdin.read())
    if not req.get("repack", False):
        without_repacking(llama_cpp)
    seqs = req["eval_ids"]
    longest = max([len(s) for s in seqs] + [8])
    threads = req.get("threads") or os.cpu_count()
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=longest + 8, n_batch=longest + 8,
                          n_threads=threads, n_threads_batch=threads, logits_all=False,
                          swa_full=True, verbose=False)
    # add_bos=True is llama.cpp's add_special: BOS only when the file's add_bos_token says so.
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in req["texts"]]
    n_vocab = llm.n_vocab()
    label_ids = req["label_ids"]
    shared = common_prefix(seqs) if len(seqs) > 1 else 0
    start = time.perf_counter()
    llm.reset()
    if shared:
        llm.eval(seqs[0][:shared])
    logits = []
    for seq in seqs:
        llm.n_tokens = shared  # eval() drops the cache from here on
        llm.eval(seq[shared:])
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        logits.append([float(row[i]) for i in label_ids])
    seconds = time.perf_counter() - start
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    print(json.dumps({"ids": ids, "logits": logits, "seconds": seconds,
                      "add_bos": bool(add_bos)}))


if __name__ == "__main__":
    main()

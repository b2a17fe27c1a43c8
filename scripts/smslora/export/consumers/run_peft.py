"""Run by smslora/export/check.py with the Python of a PyTorch environment (.venv-torch: torch,
transformers, peft), never imported by the project: a base model folder in Hugging Face's format
plus an exported PEFT adapter, loaded the way a Hugging Face user loads them, and the label
tokens' logits at the last position of each token sequence.

Reads a JSON request on stdin: {"base": DIR, "adapter": DIR, "ids": [[...], ...],
"label_ids": [spam, ham]}; writes one JSON line: {"logits": [[spam, ham], ...],
"base_logits": [...] (the base alone on the first 64, so a do-nothing adapter cannot pass), "lora_tensors": n,
"loaded_exactly": bool (every tensor of the file is in the model, equal, and none missing),
"seconds": s}.
"""

import json
import sys
import time


def main() -> None:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    req = json.loads(sys.stdin.read())
    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    base = AutoModelForCausalLM.from_pretrained(req["base"], dtype=torch.float32)
    base.eval()
    base_logits = last_logits(base, req["ids"][:64], req["label_ids"])
    model = PeftModel.from_pretrained(base, req["adapter"])
    model.eval()
    saved = load_file(f"{req['adapter']}/adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    exact = set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    start = time.perf_counter()
    logits = last_logits(model, req["ids"], req["label_ids"])
    print(json.dumps({"logits": logits, "base_logits": base_logits, "lora_tensors": len(saved),
                      "loaded_exactly": exact, "seconds": time.perf_counter() - start}))


def last_logits(model, sequences, label_ids):
    import torch

    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append([float(logits[i]) for i in label_ids])
    return out


if __name__ == "__main__":
    main()

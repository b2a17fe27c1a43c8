"""The Ollama Modelfile beside an exported GGUF: the classification prompt as the whole template
(no chat wrapping: the model was trained on the bare prompt), greedy decoding, and an answer cut
to the label. Ollama answers with the most likely continuation, " spam" or " not spam": the
project's verdict at threshold 0.5 (docs/export.md says how to apply another threshold)."""

from __future__ import annotations

from ..task import COMPLETIONS, PROMPT


def template() -> str:
    """task.PROMPT with Ollama's placeholder for the user's message."""
    if '"""' in PROMPT or "{{" in PROMPT:
        raise ValueError("the prompt cannot be written as an Ollama template")
    return PROMPT.replace("{text}", "{{ .Prompt }}")


def stop_tokens(tokenizer) -> list[str]:
    """The tokens that end a text for the model's tokenizer (mlx-lm's eos_token_ids: SmolLM2's
    <|im_end|>, Gemma's <eos>, and any end-of-turn token its generation config adds)."""
    ids = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [tokenizer.eos_token_id]
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t and '"' not in t]


def modelfile(gguf_file: str, label_tokens: int, threshold: float, stops=()) -> str:
    """The Modelfile's text. label_tokens: tokens of the longest completion (' not spam');
    stops: the end-of-text tokens."""
    lines = [
        "# SMS spam classifier: `ollama create sms-spam -f Modelfile`, then",
        ("# `ollama run sms-spam \"WINNER!! Claim your prize now\"` answers"
         f" {COMPLETIONS['spam'].strip()!r} or {COMPLETIONS['ham'].strip()!r}."),
        f"# The project calls a message spam when P(spam) > {threshold:g}; Ollama's greedy",
        "# answer is the verdict at 0.5 (docs/export.md).",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template()}"""',
        "PARAMETER temperature 0",
        "PARAMETER top_k 1",
        f"PARAMETER num_predict {label_tokens}",
        "PARAMETER num_ctx 1024",
        *[f'PARAMETER stop "{stop}"' for stop in stops],
    ]
    return "\n".join(lines) + "\n"

"""The task itself: the tutorial's prompt, the two labels and their words, and the verdict."""

from __future__ import annotations

import unicodedata

PROMPT = "Classify the following SMS message as spam or not spam.\nMessage: {text}\nClassification:"
LABELS = ("spam", "ham")
COMPLETIONS = {"spam": " spam", "ham": " not spam"}  # what the model is trained to answer
DEFAULT_THRESHOLD = 0.5
MAX_PROMPT_TOKENS = 512  # a longer message is truncated (the message, never the prompt or label)
CHARS_PER_TOKEN = 16  # a cut message is cut here first (no real text averages longer tokens)


def is_blank(text: str) -> bool:
    """Nothing a reader would see: only whitespace, control and format characters."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def format_prompt(text: str) -> str:
    return PROMPT.format(text=text)


def format_example(text: str, label: str) -> str:
    """The tutorial's training line: prompt followed by the completion."""
    return format_prompt(text) + COMPLETIONS[label]


def is_spam(p_spam, threshold: float):
    """The one decision rule: spam when P(spam) is above the threshold (scalars or arrays)."""
    return p_spam > threshold


def verdict(p_spam: float, threshold: float) -> str:
    """'spam' or 'ham' for one message."""
    return "spam" if is_spam(p_spam, threshold) else "ham"

#!/usr/bin/env python
"""Step 4: evaluate a model -> reports/eval_<name>.json.

Two views: the tutorial's language-model table (loss, perplexity, token accuracy on the 10 fixed
messages) and what a spam filter is judged by (accuracy, precision, recall, F1, ROC-AUC, ham
false-positive rate, confusion matrix) on the whole held-out test split, with P(spam) from one
forward pass per message and the threshold chosen on validation.
"""

from smslora import cli
from smslora.commands.evaluate import main

if __name__ == "__main__":
    cli.run(main)

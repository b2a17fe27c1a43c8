"""Where the project keeps its inputs and artifacts, and the artifacts' file names."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"
MODELS_DIR = ROOT / "models"
REPORTS_DIR = ROOT / "reports"
CONFIGS_DIR = ROOT / "configs"
STATIC_DIR = Path(__file__).resolve().parent / "server" / "static"

BASELINE_DIR = MODELS_DIR / "baseline"
RETRAINED_DIR = MODELS_DIR / "retrained"
ADAPTERS_DIR = RETRAINED_DIR / "adapters"
FUSED_DIR = RETRAINED_DIR / "fused"

SHIPPED_TSV = DATA_DIR / "SMSSpamCollection.tsv"
FIXED_MESSAGES = DATA_DIR / "fixed_test_messages.jsonl"
STRESS_SUITE = DATA_DIR / "stress_suite.jsonl"
SUPPLEMENTS = (DATA_DIR / "modern_sms.jsonl", DATA_DIR / "modern_sms_2.jsonl")  # written apart

# Files in a model or adapter folder.
THRESHOLD_FILE = "threshold.json"
CHECKSUMS = "checksums.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTERS_FILE = "adapters.safetensors"
METRICS_FILE = "metrics.json"  # a fused folder's own test figures (step 6), which the server reports
SOURCE_FILE = "source.json"  # where step 1 got a base folder from (its "base": the registry name)

# Files in data/ (step 2) and reports/ (steps 3-6 and the report).
SPLIT_MANIFEST = "split.json"
HELD_OUT_SPLITS = ("calibration.jsonl", "valid_modern.jsonl")


def eval_report(name: str) -> str:
    return f"eval_{name}.json"


def scores_file(name: str) -> str:
    return f"scores_{name}.jsonl"


def stress_report(name: str) -> str:
    return f"stress_{name}.json"

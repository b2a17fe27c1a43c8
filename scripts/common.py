"""Transitional re-exports while the scripts move onto the smslora package."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smslora import fastblas  # noqa: E402

fastblas.ensure()

from smslora.paths import *  # noqa: E402,F401,F403
from smslora.task import *  # noqa: E402,F401,F403
from smslora.errors import *  # noqa: E402,F401,F403
from smslora.cli import add_model_args, add_threshold_arg  # noqa: E402,F401
from smslora.artifacts import *  # noqa: E402,F401,F403
from smslora.threshold import check_threshold, read_threshold, threshold_for  # noqa: E402,F401
from smslora.model import *  # noqa: E402,F401,F403
from smslora.scoring import *  # noqa: E402,F401,F403
from smslora.scoring import _prefix_cache  # noqa: E402,F401
from smslora.loss import *  # noqa: E402,F401,F403
from smslora.metrics import *  # noqa: E402,F401,F403


def verdict_threshold(args) -> float:
    return threshold_for(args.threshold, args.model, args.adapter_path)


def scoring_provenance(model_dir, adapter_path, test_path) -> dict:
    import mlx.core as mx
    adapters = Path(adapter_path) / "adapters.safetensors" if adapter_path else None
    return {"model_weights": sorted(sha256(f) for f in Path(model_dir).glob("*.safetensors")),
            "adapters": sha256(adapters) if adapters else None,
            "test": sha256(test_path), "dequantized": on_cpu(),
            "device": str(mx.default_device())}

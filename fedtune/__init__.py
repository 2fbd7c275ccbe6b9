"""fedtune: a Hydra experiment runner for federated fine-tuning of language models."""

import logging
import warnings

__version__ = "0.1.0"

# Third-party noise that says nothing about the run: bitsandbytes' optional-kernel notice at import,
# its per-matmul cast message, and a transformers deprecation raised from inside peft.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")

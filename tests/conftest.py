"""Test-wide settings: fully offline, Triton in interpreter mode where there is no GPU.

TRITON_INTERPRET must be in the environment before any module defining a @triton.jit kernel is
imported (set later, launches fail with "0 active drivers"), so it is set here, at collection time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

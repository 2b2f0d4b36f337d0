"""Which device a Triton launch can use, shared by the kernel files."""

import os

import torch


def check_triton_device(tensor: torch.Tensor, op: str) -> None:
    """Raise one clear line when a Triton launch would fail deep inside the driver."""
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: use_triton=True needs CUDA tensors (got device {tensor.device}); pass use_triton=False "
            "on CPU, or set TRITON_INTERPRET=1 before importing kernels to run the Triton interpreter"
        )

"""Loading detector weights safely from a local path or any fsspec URL (`s3://`, `gs://`, `https://`).

`.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which
refuses pickled code. A checkpoint that nests its weights under "model" or "state_dict" (the official
GroundingDINO releases do) is unwrapped, and DataParallel's "module." prefixes are stripped.
"""

from __future__ import annotations

import io

import fsspec
import torch


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    with fsspec.open(url, "rb") as f:
        data = f.read()
    if url.lower().endswith(".safetensors"):
        from safetensors.torch import load

        state = load(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{url}: cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
                "Convert it once to safetensors (load it in a trusted session, then "
                "safetensors.torch.save_file(state_dict, 'model.safetensors')).") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{url}: expected a state dict of tensors, got {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}

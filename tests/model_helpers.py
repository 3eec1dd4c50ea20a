"""Shared test helper (not collected): random models whose weights make parity tests fail loudly."""

import torch

from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Random weights with teeth: std 0.3 and norm weights that are not all ones (a swapped norm shows)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model.eval()

"""A transformer with a scalar head: the reward model and PPO's critic.

The backbone is an ordinary `Transformer` without its language-model head; the head reads the
final hidden state of each token. `blocks` is the backbone's, so `llm.parallel` shards and
checkpoints it block by block like any language model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from llm.model.config import ModelConfig
from llm.model.transformer import Transformer


class ValueModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        # Not needed (and under DDP an unused parameter is an error); a tied head is the embedding.
        self.backbone.lm_head = None
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def forward(self, tokens: Tensor, positions: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                documents: Optional[Tensor] = None) -> Tensor:
        """tokens (B, T) -> one value per token (B, T); arguments as `Transformer.forward`'s."""
        hidden = self.backbone(tokens, positions, mask=mask, documents=documents, hidden=True)
        return self.head(hidden).squeeze(-1).float()


def build_network(cfg: ModelConfig, value_head: bool) -> nn.Module:
    """A fresh ValueModel (reward model, critic) or language model of this architecture."""
    return ValueModel(cfg) if value_head else Transformer(cfg)


def last_token_values(values: Tensor, mask: Tensor) -> Tensor:
    """The value at each row's last real token (right-padded rows): a sequence's reward."""
    last = mask.long().sum(1).clamp(min=1) - 1
    return values.gather(1, last[:, None]).squeeze(1)


def load_weights(model: ValueModel | Transformer, state: dict[str, torch.Tensor], from_value_model: bool) -> None:
    """Load a checkpoint's network weights: a language model's into a Transformer or into a
    ValueModel's backbone (the new value head keeps its initialisation), a value model's into a
    ValueModel. A language model cannot start from a value model (it has no LM head)."""
    if from_value_model:
        if not isinstance(model, ValueModel):
            raise ValueError("the checkpoint is a reward/value model; a language model cannot start from it")
        model.load_state_dict(state)
        return
    target = model.backbone if isinstance(model, ValueModel) else model
    own = target.state_dict()
    headless = target.lm_head is None or target.cfg.tie_embeddings  # no head of its own to load
    missing = [k for k in own if k not in state and not (headless and k.startswith("lm_head."))]
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]} for this architecture")
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

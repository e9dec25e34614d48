"""Reward-model components: sequences of (prompt, answer) ids, the score at the last real token, the
Bradley–Terry loss, and a scorer with the stored normalization (eval, PPO, GRPO and DPO's data use it).

A reward model is the SFT backbone with a scalar head (`ModelConfig.head = "score"`, saved in
transformers' LlamaForSequenceClassification layout). It reads each sequence at its last real token:
the <|im_end|> that closes a finished answer, or the last answer token of one cut without it, so a
truncated answer is judged as truncated. Sequences are right-padded here; with left padding the last
real token is the last position. `last_index` handles both (tests/model/test_rewards.py).

Normalization (OpenAI's, Ziegler et al. 2019): a gain and bias so that the RM's scores of the SFT
model's own samples are ~N(0, 1); RL rewards and the KL penalty then have a known scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.checkpoint import load_model
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.model.losses import ScalarValues, right_pad
from zero_chatgpt.model.transformer import Transformer

NORM_FILE = "reward_norm.json"


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The prompt as the chat model sees it before answering."""
    return tok.encode_chat(messages, add_generation_prompt=True)[0]


def answer_ids(tok, text: str, ended: bool = True) -> list[int]:
    """An answer's ids as the chat model would produce them: the text, then <|im_end|> if it ended."""
    return tok.encode(text) + ([tok.im_end_id] if ended else [])


def pad_sequences(seqs: list[list[int]], pad_id: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and the index of each row's last real token; rows longer than max_len
    keep their last max_len tokens (the answer end is what is scored)."""
    if max_len is not None:
        seqs = [s[-max_len:] for s in seqs]
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return right_pad(seqs, pad_id), last


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of each row's last real token under right or left padding (mask 1 = real)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def sequence_scores(model, ids: torch.Tensor, last: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(B,) raw scores of a score-head model at each row's last real token (fp32)."""
    values = model(ids, attention_mask=attention_mask, output=ScalarValues())
    return values.gather(1, last.to(values.device)[:, None]).squeeze(1)


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r⁺ − r⁻) (Bradley & Terry 1952; the InstructGPT reward loss, one pair per prompt)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@dataclass
class Normalization:
    gain: float = 1.0
    bias: float = 0.0
    fitted_on: int = 0          # how many scores the gain and bias were fitted on

    @classmethod
    def fit(cls, raw: np.ndarray) -> "Normalization":
        std = float(np.std(raw)) or 1.0
        return cls(gain=1.0 / std, bias=-float(np.mean(raw)) / std, fitted_on=int(len(raw)))

    def __call__(self, raw):
        return raw * self.gain + self.bias


class RewardScorer:
    """A trained reward model with its normalization: `score(prompts, answers)` in normalized units."""

    def __init__(self, model, norm: Normalization, pad_id: int, batch_size: int = 64, max_len: int | None = None):
        self.model, self.norm, self.pad_id = model.eval(), norm, pad_id
        self.batch_size = batch_size
        self.max_len = max_len or model.config.max_position_embeddings

    @classmethod
    def load(cls, folder: str | Path, pad_id: int, device="cpu", **kw) -> "RewardScorer":
        folder = Path(folder)
        model = load_model(folder, device=device)
        try:
            norm = Normalization(**json.loads((folder / NORM_FILE).read_text()))
        except FileNotFoundError:
            norm = Normalization()
        return cls(model, norm, pad_id, **kw)

    @torch.no_grad()
    def raw(self, prompts: list[list[int]], answers: list[list[int]]) -> np.ndarray:
        """Unnormalized scores of prompt + answer id sequences (answers end with <|im_end|> if they ended)."""
        device = next(self.model.parameters()).device
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = np.zeros(len(seqs), dtype=np.float64)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, last = pad_sequences([seqs[i] for i in idx], self.pad_id, self.max_len)
            out[idx] = sequence_scores(self.model, ids.to(device), last).double().cpu().numpy()
        return out

    def score(self, prompts: list[list[int]], answers: list[list[int]]) -> np.ndarray:
        return self.norm(self.raw(prompts, answers))


def score_model_from(path: Path, seed: int = 0) -> Transformer:
    """The model at `path` (an LM checkpoint) with its lm_head replaced by a new scalar head, drawn from a
    generator of its own seeded by `seed`: the head is then the same whatever else drew random numbers
    earlier in the process (a `run` that trained SFT first, or a rerun that found the pairs built)."""
    cfg = ckpt.read_model_config(path)
    if cfg.head == "score":
        return ckpt.load_model(path).train()
    cfg.head, cfg.tie_word_embeddings = "score", False
    model = ckpt.empty_model(cfg)          # every weight but the head is read from the file below
    state = {k: v for k, v in ckpt.read_model_state(path).items() if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"score.weight"} or unexpected:
        raise UserError(f"{path}: not a backbone for a reward model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    with torch.no_grad():
        g = torch.Generator().manual_seed(int(seed))
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) / math.sqrt(cfg.hidden_size + 1))
    return model


def load_scorer(rd, tok, cfg, device="cpu") -> RewardScorer:
    """The run's reward model with its normalization, scoring at most rm.max_seq_len tokens (PPO, GRPO)."""
    return RewardScorer.load(rd / "rm" / "final", tok.pad_id, device=device, max_len=cfg.rm.max_seq_len)

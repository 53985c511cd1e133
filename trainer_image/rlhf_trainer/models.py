"""Loading, building and saving the models of the three stages.

Reward model on disk (a Hugging Face directory plus two small files)::

    config.json, model.safetensors, tokenizer files   backbone (AutoModel) or a *ForSequenceClassification model
    value_head.safetensors                            linear head hidden -> 1 (head: value_head)
    reward_model.json                                 {"head", "max_length", "stats": {"mean", "std", "n"}}

The score of a sequence is read at its last non-padding token, which is always EOS
(``data.encoding.encode_for_scoring``), at training and at scoring time alike. (With
``head: sequence_classification`` the transformers head pools: decoder models read the last
non-pad token too, encoder models such as BERT their pooled first token.) The tokenizer's pad
token is set and differs from EOS (a sequence-classification head finds the last real token by
looking for the pad id).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, ModelConfig
from .data.encoding import encode_for_scoring, pad_batch, render_full
from .ops import last_token_index
from .runtime.failure import ModelError

REWARD_MODEL_FILE = "reward_model.json"
VALUE_HEAD_FILE = "value_head.safetensors"
PAD_TOKEN = "<|pad|>"


# --- tokenizers ----------------------------------------------------------------------------------

def _source(model_cfg: ModelConfig, what: str = "path") -> str:
    """Local path (must exist) or hub id of a model/tokenizer."""
    path = model_cfg.tokenizer_path if what == "tokenizer" and model_cfg.tokenizer_path else model_cfg.path
    if path:
        if not Path(path).exists():
            field = "tokenizer_path" if what == "tokenizer" and model_cfg.tokenizer_path else "path"
            raise ModelError(f"model.{field} {path} does not exist; check the path and the volume mount")
        return path
    if model_cfg.hub_id:
        return model_cfg.hub_id
    raise ConfigError("model: set tokenizer_path (or path) - a tokenizer is needed also with init_from_config")


def prepare_tokenizer(tokenizer):
    """Set EOS (BERT-style tokenizers: [SEP]) and a pad token distinct from EOS; pad on the right."""
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is not None:
            tokenizer.eos_token = tokenizer.sep_token
        else:
            tokenizer.add_special_tokens({"eos_token": "</s>"})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    src = _source(model_cfg, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=Path(src).exists(), trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unusable dirs
        raise ModelError(f"cannot load a tokenizer from {src}: {e}") from e
    return prepare_tokenizer(tok)


def _fit_vocab(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (pad); record the special ids in the config."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    for name in ("pad_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))


def _from_config(model_cfg: ModelConfig, tokenizer, auto_cls):
    from transformers import AutoConfig

    init = dict(model_cfg.init_from_config)
    model_type = init.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.init_from_config: set model_type (e.g. gpt2) next to the other config fields")
    init.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):  # defaults of e.g. gpt2 name ids of its own vocab
        own = getattr(tokenizer, name)
        init.setdefault(name, own if own is not None else tokenizer.eos_token_id)
    try:
        config = AutoConfig.for_model(model_type, **init)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.init_from_config: {e}") from e
    return auto_cls.from_config(config, dtype=torch.float32)


def _load(auto_cls, model_cfg: ModelConfig, tokenizer, **kwargs):
    if model_cfg.init_from_config:
        model = _from_config(model_cfg, tokenizer, auto_cls)
    else:
        src = _source(model_cfg)
        try:
            # Model code and weights from a claim or the hub are data: never run their Python files, never
            # unpickle a pytorch_model.bin beyond tensors (safetensors are preferred when both exist).
            model = auto_cls.from_pretrained(src, dtype=torch.float32, local_files_only=Path(src).exists(),
                                             trust_remote_code=False, weights_only=True, **kwargs)
        except Exception as e:
            raise ModelError(f"cannot load a model from {src} ({auto_cls.__name__}): {e}") from e
    _fit_vocab(model, tokenizer)
    return model


def load_causal_lm(model_cfg: ModelConfig, tokenizer):
    """A causal LM from a local path / hub id, or freshly built from ``init_from_config``."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, model_cfg, tokenizer)


def load_backbone(model_cfg: ModelConfig, tokenizer):
    """The bare transformer (AutoModel) of a model directory; BERT's unused pooler is dropped."""
    from transformers import AutoModel

    backbone = _load(AutoModel, model_cfg, tokenizer)
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused: the score comes from the last token's hidden state
    return backbone


# --- reward model and critic ---------------------------------------------------------------------

def _hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ModelError(f"cannot tell the hidden size of a {type(config).__name__}")


class ValueHeadModel(nn.Module):
    """Transformer backbone + linear value head: one scalar per token."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = _hidden_size(backbone.config)
        if value_head is None:
            value_head = nn.Linear(hidden, 1)
            nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    def values(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


class RewardModel(ValueHeadModel):
    """``forward`` -> one score per sequence, read at the last non-padding token."""

    head = "value_head"

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        values = self.values(input_ids, attention_mask, position_ids)
        idx = last_token_index(attention_mask)
        return values.gather(1, idx.unsqueeze(1)).squeeze(1)


class CriticModel(ValueHeadModel):
    """PPO critic: ``forward`` -> per-token values ``(batch, seq)``."""

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        return self.values(input_ids, attention_mask, position_ids)


class SeqClassRewardModel(nn.Module):
    """A ``*ForSequenceClassification`` model with one label; ``forward`` -> one score per sequence."""

    head = "sequence_classification"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, 0].float()


def build_reward_model(model_cfg: ModelConfig, tokenizer, head: str = "value_head") -> nn.Module:
    """A trainable reward model (value head on a backbone, or a sequence-classification model)."""
    if head == "sequence_classification":
        from transformers import AutoModelForSequenceClassification

        if model_cfg.init_from_config:
            model_cfg = copy.deepcopy(model_cfg)
            model_cfg.init_from_config["num_labels"] = 1
            return SeqClassRewardModel(_load(AutoModelForSequenceClassification, model_cfg, tokenizer))
        return SeqClassRewardModel(_load(AutoModelForSequenceClassification, model_cfg, tokenizer, num_labels=1))
    return RewardModel(load_backbone(model_cfg, tokenizer))


def _reward_meta(path: Path) -> dict[str, Any]:
    meta_file = path / REWARD_MODEL_FILE
    if not meta_file.exists():
        raise ModelError(f"{path} is not a reward model: {REWARD_MODEL_FILE} is missing "
                         "(train one with the reward stage)")
    return json.loads(meta_file.read_text())


def save_reward_model(model: nn.Module, tokenizer, out_dir: str | Path, stats: dict[str, float] | None,
                      max_length: int, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a reward model in the layout above (``state_dict``: a gathered one under ZeRO-3)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    if isinstance(model, SeqClassRewardModel):
        model.model.save_pretrained(out, state_dict={k[len("model."):]: v for k, v in sd.items()})
    else:
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_sd = {k[len("value_head."):]: v.detach().float().contiguous()
                   for k, v in sd.items() if k.startswith("value_head.")}
        model.backbone.save_pretrained(out, state_dict=backbone_sd)
        save_file(head_sd, str(out / VALUE_HEAD_FILE))
    tokenizer.save_pretrained(out)
    meta = {"head": model.head, "max_length": max_length, "stats": stats}
    (out / REWARD_MODEL_FILE).write_text(json.dumps(meta, indent=2))


def load_reward_model(path: str | Path) -> tuple[nn.Module, Any, dict[str, float] | None]:
    """(model in eval mode, tokenizer, normalisation stats {mean, std, n} or None) of a saved reward model."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"reward model path {path} does not exist")
    meta = _reward_meta(path)
    cfg = ModelConfig(path=str(path))
    tokenizer = load_tokenizer(cfg)
    if meta["head"] == "sequence_classification":
        from transformers import AutoModelForSequenceClassification

        model: nn.Module = SeqClassRewardModel(_load(AutoModelForSequenceClassification, cfg, tokenizer, num_labels=1))
    else:
        model = RewardModel(load_backbone(cfg, tokenizer))
        model.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
    model.max_length = meta.get("max_length", 512)
    return model.eval(), tokenizer, meta.get("stats")


def load_critic(path: str | Path, init_value_head: str = "copy") -> tuple[CriticModel, Any]:
    """A PPO critic on the backbone of a reward model (or of any model directory): per-token values.

    ``init_value_head``: ``copy`` takes the reward model's value head when it has one, ``fresh``
    starts a new head. Returns ``(critic, tokenizer)``.
    """
    path = Path(path)
    cfg = ModelConfig(path=str(path))
    tokenizer = load_tokenizer(cfg)
    head = None
    meta_file = path / REWARD_MODEL_FILE
    if init_value_head == "copy" and meta_file.exists() and json.loads(meta_file.read_text())["head"] == "value_head":
        sd = load_file(str(path / VALUE_HEAD_FILE))
        head = nn.Linear(sd["weight"].shape[1], 1)
        head.load_state_dict(sd)
    elif init_value_head not in ("copy", "fresh"):
        raise ValueError(f"init_value_head must be 'copy' or 'fresh', got {init_value_head!r}")
    return CriticModel(load_backbone(cfg, tokenizer), head), tokenizer


def critic_from_reward_model(model: RewardModel) -> CriticModel:
    """A trainable critic that starts as a copy of a value-head reward model."""
    return CriticModel(copy.deepcopy(model.backbone), copy.deepcopy(model.value_head))


# --- scoring -------------------------------------------------------------------------------------

@torch.no_grad()
def score(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int | None = None,
          batch_size: int = 16) -> torch.Tensor:
    """Raw reward scores (float32, on the CPU) of full texts, encoded exactly as in training."""
    max_length = max_length or getattr(model, "max_length", 512)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [encode_for_scoring(tokenizer, t, max_length) for t in texts[i:i + batch_size]]
        batch = {k: v.to(device) for k, v in pad_batch(ids, tokenizer.pad_token_id).items()}
        out.append(model(**batch).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def score_responses(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                    max_length: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """Scores of (prompt, response) pairs rendered as in reward training (chat template if any)."""
    texts = [render_full(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return score(model, tokenizer, texts, max_length, batch_size)


def normalize(scores: torch.Tensor, stats: dict[str, float] | None) -> torch.Tensor:
    """``(score - mean) / std`` with the train-set statistics saved with the reward model."""
    if not stats:
        return scores
    return (scores - stats["mean"]) / max(stats["std"], 1e-8)


def save_causal_lm(model: nn.Module, tokenizer, out_dir: str | Path,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)

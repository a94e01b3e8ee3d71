"""Tiny models built from config and tiny datasets: no downloads, milliseconds per step."""

import itertools

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


VOCAB = 40
SEQ = 8


def tiny_gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(num_attention_heads: int = 2, num_key_value_heads: int = 1) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        **kwargs,
    )  # fmt: skip


def tiny_bert_mlm() -> BertForMaskedLM:
    return BertForMaskedLM(_bert_config())


def tiny_bert_classifier(num_labels: int = 3) -> BertForSequenceClassification:
    return BertForSequenceClassification(_bert_config(num_labels=num_labels))


class MLP(nn.Module):
    """A plain module with the HF calling convention: forward(pixel_values, labels) -> {"loss", "logits"}.

    Its forward takes no **kwargs, so the Trainer does not pass num_items_in_batch and divides the loss by the
    gradient-accumulation steps itself (the other branch of the GA logic from the HF models)."""

    def __init__(self, sizes=(6, 10, 10, 4)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def lm_samples(n: int = 16, *, seed: int = 0, low: int = 1, high: int = VOCAB, pad_last: int = 0) -> list[dict]:
    """Token sequences with labels = input_ids (the model shifts them); the last ``pad_last`` positions of every
    other sample are padding (attention 0, label −100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, SEQ), generator=g)
    out = []
    for i in range(n):
        attention = torch.ones(SEQ, dtype=torch.long)
        labels = ids[i].clone()
        if pad_last and i % 2:
            attention[-pad_last:] = 0
            labels[-pad_last:] = -100
        out.append({"input_ids": ids[i], "attention_mask": attention, "labels": labels})
    return out


def cls_samples(n: int = 16, *, seed: int = 0, num_labels: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def vec_samples(n: int = 32, *, seed: int = 0, dim: int = 6, num_labels: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]

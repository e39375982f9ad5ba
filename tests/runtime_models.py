"""Tiny random BERT-family classifiers with BayesLoRA adapters, a word-level tokenizer, and the
torch reference outputs the runtime tests compare against."""

from __future__ import annotations

import numpy as np
import torch

import bayeslora as bl
import tiny_models
from bayeslora.nn.model import adapted_layers

VOCAB = tiny_models.VOCAB
FAMILIES = ("bert", "distilbert", "roberta")
# per family: the linear layers a test may adapt (attention, FFN, head)
TARGETS = {
    "bert": [
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "pooler.dense",
        "classifier",
    ],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "pre_classifier", "classifier"],
    "roberta": ["query", "value", "intermediate.dense", "classifier.dense", "out_proj"],
}


def build(
    family: str,
    hidden: int = 16,
    heads: int = 2,
    layers: int = 2,
    inter: int = 24,
    labels: int = 3,
    seed: int = 0,
    act: str = "gelu",
) -> torch.nn.Module:
    """A random sequence classifier in eval mode with dropout off (``tiny_models.build``)."""
    return tiny_models.build(family, hidden, heads, layers, inter, labels, seed, act)


def adapt(
    model: torch.nn.Module,
    targets: list[str],
    rank: int = 4,
    method: str = "bayeslora",
    posterior: str = "gate",
    seed: int = 0,
    log_alpha: tuple[float, float] = (-4.0, 1.0),
    **config: object,
) -> torch.nn.Module:
    """Inject adapters with non-zero B and random rank parameters (all below τ = 3)."""
    cfg = bl.BayesLoRAConfig(
        rank=rank, target_modules=targets, method=method, posterior=posterior, init_b_std=0.3, **config
    )
    bl.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if posterior == "additive" and method == "bayeslora":
                layer.lora_B.normal_(0.0, 0.3, generator=g)
                layer.log_sigma2.uniform_(-6.0, -2.0, generator=g)
            if layer.uses_gate:
                layer.log_alpha.uniform_(*log_alpha, generator=g)
    return model.eval()


def batch(
    n: int = 3, t: int = 7, seed: int = 0, pad: bool = True, family: str = "bert"
) -> dict[str, torch.Tensor]:
    """Random ids in [4, VOCAB) with right padding on odd rows (pad id 1 for RoBERTa, else 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    pad_id = 1 if family == "roberta" else 0
    if pad and t > 1:
        for i in range(1, n, 2):
            cut = int(torch.randint(1, t, (1,), generator=g))
            ids[i, cut:] = pad_id
            mask[i, cut:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def np_inputs(inputs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, attention mask) of a ``batch`` as numpy, for ``Scorer.logits``."""
    return inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()


def mask_some_ranks(model: torch.nn.Module, seed: int) -> list:
    """Switch off about 30 % of every adapter's ranks by mask, as training's pruning does (seeded);
    returns the adapted layers."""
    g = torch.Generator().manual_seed(seed)
    layers = [layer for _, layer in adapted_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.rank_mask.copy_((torch.rand(layer.rank, generator=g) > 0.3).float())
    return layers


def torch_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.double().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def word_tokenizer():  # -> tokenizers.Tokenizer
    """A word-level tokenizer over "w4" … "w63" with [CLS]/[SEP] around each text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


# DeBERTa-v2's linear layers a test may adapt (pos_*_proj exist without share_att_key only)
DEBERTA_TARGETS = [
    "query_proj",
    "key_proj",
    "value_proj",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
    "pooler.dense",
    "classifier",
]


def build_deberta(
    hidden: int = 16,
    heads: int = 2,
    layers: int = 2,
    inter: int = 24,
    labels: int = 3,
    seed: int = 0,
    **options: object,
) -> torch.nn.Module:
    """A random ``DebertaV2ForSequenceClassification`` in eval mode with dropout off; ``options``
    are ``DebertaV2Config`` fields (relative attention, buckets, ...). Every LayerNorm gets random
    affine parameters, so that mixing up two of them shows."""
    import transformers as tf

    torch.manual_seed(seed)
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "max_position_embeddings": 64,
        "num_labels": labels,
        "initializer_range": 0.2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pooler_dropout": 0.0,
        "type_vocab_size": 0,
        **options,
    }
    model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return model.eval()

"""Tiny random transformers of five families, built in-process, with their usual LoRA targets; and
tiny random causal LMs of five families (``build_causal_lm``).

The one model factory of the tests (``runtime_models`` adds adapters and tokenizers; the benches time
the MiniLM shape, ``benches/minilm_shape.py``)."""

from __future__ import annotations

import torch

FAMILIES = ("bert", "distilbert", "gpt2", "llama")  # the torch-side property tests
VOCAB = 64
QV_TARGETS = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
HEADS = {"bert": "classifier", "distilbert": "classifier", "gpt2": "score", "llama": "score"}


def build(
    family: str,
    hidden: int = 16,
    heads: int = 2,
    layers: int = 2,
    inter: int = 32,
    labels: int = 3,
    seed: int = 0,
    act: str = "gelu",
) -> torch.nn.Module:
    """A random sequence classifier in eval mode, with every dropout off; labels ``class_i``.
    ``act``: the FFN activation of the BERT-family models (bert, distilbert, roberta)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family in ("bert", "roberta"):
        bert = family == "bert"
        config_cls, model_cls = (
            (tf.BertConfig, tf.BertForSequenceClassification)
            if bert
            else (tf.RobertaConfig, tf.RobertaForSequenceClassification)
        )
        cfg = config_cls(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=64 if bert else 64 + 2,  # RoBERTa numbers from pad id + 1
            num_labels=labels,
            initializer_range=0.2,
            hidden_act=act,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **({} if bert else {"pad_token_id": 1}),
        )
        model = model_cls(cfg)
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB,
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=inter,
            max_position_embeddings=64,
            num_labels=labels,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            activation=act,
            initializer_range=0.2,
        )
        model = tf.DistilBertForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = _gpt2_config(hidden, heads, layers, inter, num_labels=labels)
        model = tf.GPT2ForSequenceClassification(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=64,
            num_labels=labels,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            initializer_range=0.2,
        )
        model = tf.LlamaForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    model.config.id2label = {i: f"class_{i}" for i in range(labels)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model.eval()


CAUSAL_FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "gemma")  # tests/test_lm.py
CAUSAL_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gemma": ["q_proj", "v_proj"],
}


def _gpt2_config(hidden: int, heads: int, layers: int, inter: int, **extra):
    """A tiny GPT-2 config, every dropout off; vocabulary ``VOCAB``, pad id 0, BOS/EOS id 1."""
    import transformers as tf

    return tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=inter,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
        **extra,
    )


def build_causal_lm(
    family: str, hidden: int = 16, heads: int = 2, layers: int = 2, inter: int = 32, seed: int = 0
):
    """A random causal LM (``AutoModelForCausalLM.from_config``) in eval mode with every dropout off;
    vocabulary ``VOCAB``, pad id 0, BOS/EOS id 1."""
    import transformers as tf

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    common = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
        **ids,
    }
    if family == "gpt2":
        cfg = _gpt2_config(hidden, heads, layers, inter)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=heads, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=1, **common)  # grouped-query attention
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **common)
    elif family == "gemma":
        cfg = tf.GemmaConfig(num_key_value_heads=1, head_dim=hidden // heads, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def batch(n: int = 3, t: int = 7, seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids in [2, VOCAB) with right padding (id 0) on some rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad and t > 2:
        for i in range(1, n, 2):
            cut = int(torch.randint(2, t, (1,), generator=g))
            ids[i, cut:] = 0
            mask[i, cut:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits

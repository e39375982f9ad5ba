"""Every name bayeslora gives a file on disk, its format versions, the fields of its outputs and the
names of classifier heads: one constant per fact (docs/formats.md describes the formats).

Plain data, no imports: the torch side (``nn``, ``train``, ``formats``) and the torch-free side
(``runtime``, ``analysis``, ``_atomic``, ``cli``) read the same names from here. The Rust bundle
reader has its own copies of the bundle's names and version (``rust/bayeslora-core/src/bundle/mod.rs``);
``tests/test_layout.py`` checks that they agree.
"""

from __future__ import annotations

# ---- runtime bundle (formats/bundle.py writes it; runtime.py, analysis and the Rust core read it) ----
BUNDLE_META = "bayeslora.json"
BUNDLE_HF_CONFIG = "config.json"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_TOKENIZER = "tokenizer.json"  # optional
BUNDLE_FILES = (BUNDLE_META, BUNDLE_HF_CONFIG, BUNDLE_WEIGHTS, BUNDLE_TOKENIZER)
BUNDLE_FORMAT_VERSION = 1

# ---- adapter directory (nn/checkpoint.py: bl.save_adapter / bl.load_adapter) --------------------------
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "bayeslora_adapter.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
ADAPTER_FORMAT_VERSION = 1

# ---- training checkpoint (train/pipeline.py: bayeslora train) ------------------------------------------
RUN_FILE = "run.json"  # the run's settings and results; identifies a checkpoint
CHECKPOINT_ADAPTER = "adapter"  # an adapter directory
CHECKPOINT_TOKENIZER = "tokenizer"  # the tokenizer, saved by transformers
CHECKPOINT_TRAINER = "checkpoints"  # the Trainer's own output_dir
TRAINING_STATE = "bayeslora_training.json"  # BayesLoRATrainer's state inside a Trainer checkpoint

# ---- PEFT LoRA directory (formats/peft.py, peft_import.py: bl.export_peft / bl.import_peft) ----------
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
POSTERIOR_WEIGHTS = "bayeslora_posterior.safetensors"  # the posterior, beside PEFT's files
POSTERIOR_META = "bayeslora_posterior.json"
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, POSTERIOR_META, POSTERIOR_WEIGHTS)
POSTERIOR_FORMAT_VERSION = 1

# ---- output directories (_atomic.py) -----------------------------------------------------------------
OUTPUT_MARKER = ".bayeslora-output.json"  # written into every directory bayeslora writes
OUTPUT_MARKER_FORMAT = "bayeslora-output"

# ---- per-input uncertainty fields (docs/method.md §6): Scorer.score, bl.mc_predict, bayeslora score --
UNCERTAINTY_FIELDS = (
    "probs",
    "label",
    "confidence",
    "entropy",
    "expected_entropy",
    "mutual_info",
    "variance",
)

# ---- classifier heads ----------------------------------------------------------------------------------
# the sequence-classification head attributes of 🤗 models (BERT-likes: classifier; GPT-2, Llama: score);
# PEFT's SEQ_CLS task adds the same two to modules_to_save
SEQ_CLS_HEADS = ("classifier", "score")
# the head's output weight in a state dict (RoBERTa's head ends in out_proj)
SEQ_CLS_HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
# output heads that target_modules="all-linear" leaves alone, as PEFT does
OUTPUT_HEADS = (*SEQ_CLS_HEADS, "lm_head", "qa_outputs", "pre_classifier", "cls")

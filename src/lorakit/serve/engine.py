"""The serving engine: one frozen base, many adapters, mixed-adapter batches.

Causal LMs decode with their own loop over ``model(...)`` and a KV cache: prompts are
left-padded (attention mask and explicit position ids, so padding changes nothing), every
decoding step is ONE forward for all rows with ``adapter_names=[...]``, and each row finishes
on its own (EOS, a stop string or its ``max_tokens``); finished rows leave the batch and the
cache. Queued requests join a running batch between steps (continuous batching): they are
prefilled in one forward, then the two KV caches are left-padded to one length (the padding
masked out) and stacked, so a long generation never holds new requests back. Adapter changes
(load, hot swap, unload) never wait for a running request either: they are applied between two
steps, and a request keeps the adapter version it was admitted with until it ends (see
:mod:`lorakit.serve.adapters`). Text is handed out token by token, holding back only what could
still turn into a stop string or an unfinished UTF-8 character, so a stream concatenates to the
non-streamed text.

Classification models (a base plus adapters that carry a classification head) answer one
forward per batch of texts.

Chat prompts use the tokenizer's chat template; without one they use :data:`DEFAULT_CHAT_TEMPLATE`::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

(one ``<|role|>`` line and the message per turn, then the ``<|assistant|>`` line to answer on),
encoded with the tokenizer's special tokens (e.g. BOS).
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.io.adapter_files import CONFIG_NAME, WEIGHTS_NAME, adapter_folder, read_adapter
from lorakit.io.safetensors_reader import SafetensorsError, read_header
from lorakit.mixed import BASE
from lorakit.model import AdaptedModel
from lorakit.serve.adapters import Load, ServedAdapters
from lorakit.serve.batcher import Job
from lorakit.serve.decoding import DecodeBatch, Row, merge_batches, mergeable, trim_left_padding
from lorakit.serve.jobs import (
    ClassificationJob,
    Classified,
    GenerationJob,
    ServeError,
)
from lorakit.serve.wording import in_http_words, quantised_base_note
from lorakit.targets import CLASSIFIER_HEADS
from lorakit.train.batches import chat_prompt_ids
from lorakit.train.chat import saved_template

log = logging.getLogger("lorakit.serve")

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
NAME_RULE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
@dataclass
class Metrics:
    batches: int = 0
    forward_calls: int = 0
    forward_rows: int = 0
    max_rows: int = 0
    jobs: int = 0
    joined: int = 0  # jobs that joined a running generation between steps
    generated_tokens: int = 0
    adapters_per_forward: int = 0  # summed over forwards: distinct adapters (incl. base) in each
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        calls = max(self.forward_calls, 1)
        return {
            "batches": self.batches, "forward_calls": self.forward_calls, "forward_rows": self.forward_rows,
            "mean_rows_per_forward": self.forward_rows / calls, "max_rows_per_forward": self.max_rows,
            "mean_adapters_per_forward": self.adapters_per_forward / calls, "jobs": self.jobs,
            "joined_running_batch": self.joined,
            "generated_tokens": self.generated_tokens, "uptime_s": time.time() - self.started,
        }


class Engine:
    """A frozen base model with named adapters, run in mixed-adapter batches by one worker thread."""

    def __init__(self, model: AdaptedModel, tokenizer, *, task: str, adapter_root: str | Path,
                 model_spec: str = "", max_prompt_tokens: int = 2048, max_tokens_limit: int = 512,
                 base_classifies: bool = False, label_names: dict[str, list[str]] | None = None) -> None:
        if task not in ("causal-lm", "classify"):
            raise ConfigError(f"task must be 'causal-lm' or 'classify', got {task!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.adapter_root = Path(adapter_root).resolve()
        self.model_spec = model_spec
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.base_classifies = base_classifies
        self.lock = threading.RLock()  # held by a running batch, and by adapter changes when none runs
        self.adapters = ServedAdapters(model, self.lock)
        self.label_names: dict[str, list[str]] = self.adapters.label_names  # by served name
        self.label_names.update(label_names or {})
        self.sources: dict[str, str] = self.adapters.sources  # served name → its folder
        self.metrics = Metrics()
        self.created = int(time.time())
        config = model.model.config
        self.pad_id = _first_int(getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None), 0)
        self.eos_ids = _eos_ids(tokenizer, model.model)
        self.max_length = _max_length(config)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self.num_labels = int(getattr(config, "num_labels", 0) or 0)
        forward = inspect.signature(model.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers 5.x renamed it
        self._decode_cleanup = "clean_up_tokenization_spaces" in inspect.signature(tokenizer.decode).parameters or \
            hasattr(tokenizer, "clean_up_tokenization_spaces")

    def decode(self, ids: list[int]) -> str:
        """Generated ids → text, without the clean-up that would rewrite text already streamed."""
        if self._decode_cleanup:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- what is served ----------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """The served adapters (a snapshot: request handlers read it without waiting for the lock)."""
        return self.adapters.names()

    def has(self, name: str) -> bool:
        return self.adapters.version(name) is not None

    def require(self, name: str) -> str:
        """The model's name for the adapter version ``name`` serves now; 404 when none is served."""
        version = self.adapters.version(name)
        if version is None:
            if name in self.adapters.unloading:
                raise ServeError(404, f"The model `{name}` is being unloaded: requests already running on it finish, "
                                 "new ones are refused. Load it again (POST /v1/adapters) to serve it.",
                                 "model_not_found", "model")
            served = ", ".join([BASE, *self.adapter_names()])
            raise ServeError(404, f"The model `{name}` does not exist. Served: {served}", "model_not_found", "model")
        if self.task == "classify" and name == BASE and not self.base_classifies:
            raise ServeError(400, "the base model has no trained classification head; name an adapter that carries one",
                             "invalid_model", "model")
        return version

    # -- adapters ----------------------------------------------------------------------------
    def resolve_under_root(self, path: str) -> Path:
        """An adapter folder given relative to (or absolute inside) the adapter root; 403 if it escapes."""
        if not path or "\x00" in path:
            raise ServeError(400, "path must be a non-empty folder name under the adapter root", param="path")
        folder = (self.adapter_root / path).resolve()
        if folder == self.adapter_root or not folder.is_relative_to(self.adapter_root):
            raise ServeError(403, f"path {path!r} is outside this server's adapter folder; give the path of a folder "
                             "inside it, relative to it (e.g. 'my-adapter')", "path_not_allowed", "path")
        folder = adapter_folder(folder)  # a `lorakit train` run folder serves its adapter
        if not (folder / CONFIG_NAME).is_file():
            raise ServeError(400, f"path {path!r} is neither an adapter folder nor a training run folder (no "
                             f"{CONFIG_NAME})", "invalid_adapter", "path")
        return folder

    def load(self, name: str, path: str) -> dict[str, Any]:
        """Load (or hot-swap) adapter ``name`` from a folder under the root. Nothing changes on error.

        The file is read and checked here; the model changes between two decoding steps of the
        running batch (or at once when none runs), so this waits for at most one step. Requests
        admitted afterwards use the new weights; requests running on the old version finish on
        it (see :mod:`lorakit.serve.adapters`). ``warnings`` in the answer are logged too.
        """
        check_name(name)
        folder = self.resolve_under_root(path)
        try:
            labels = self._check_head(folder)
            # Reading the file and checking its values touch no model state: done here, they keep
            # batches running. A file written before the change is applied is read again then.
            adapter = read_adapter(folder)
            change = self.adapters.load(Load(name, adapter, labels, str(folder)))
        except ServeError:
            raise
        except (LorakitError, OSError) as exc:  # corrupt files, wrong shapes, another base's fingerprint
            raise ServeError(400, f"cannot load adapter {name!r} from {path!r}: {in_http_words(exc)}",
                             "invalid_adapter") from exc
        log.info("%s adapter %r from %s", "replaced" if change.replaced else "loaded", name, folder)
        warnings = [note for note in [quantised_base_note(name, adapter.lorakit)] if note]
        for note in warnings:
            log.warning(note)
        return {"id": name, "object": "adapter", "path": str(folder.relative_to(self.adapter_root)),
                "replaced": change.replaced, "warnings": warnings}

    def unload(self, name: str) -> dict[str, Any]:
        """Stop serving ``name`` now, without waiting: new requests naming it get 404, requests
        already running on it (``running`` in the answer) finish on it, and its tensors are freed
        between decoding steps once none of them runs any more."""
        if name == BASE:
            raise ServeError(400, "the base model cannot be unloaded", "invalid_model", "name")
        running = self.adapters.unload(name)
        if running is None:
            being = " (it is already being unloaded)" if name in self.adapters.unloading else ""
            raise ServeError(404, f"no adapter named {name!r} is loaded{being}", "model_not_found", "name")
        return {"id": name, "object": "adapter", "deleted": True, "running": running}

    def _check_head(self, folder: Path) -> list[str]:
        """For a classifier server: the adapter must carry a head of the served size. Its label names."""
        if self.task != "classify":
            return []
        heads, metadata = adapter_heads(folder)
        if not heads:
            heads_named = ", ".join(CLASSIFIER_HEADS)
            raise ServeError(400, f"adapter {folder.name!r} carries no classification head ({heads_named}); a "
                             "classifier server needs one per adapter", "invalid_adapter")
        if heads[0] != self.num_labels:
            raise ServeError(400, f"adapter {folder.name!r} has a {heads[0]}-label head; this server's base was "
                             f"built with {self.num_labels} labels", "invalid_adapter")
        names = metadata.get("label_names")
        return [str(n) for n in names] if isinstance(names, list) and len(names) == self.num_labels else []

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ServeError(400, f"prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})", param="prompt")
        return ids

    def render_chat(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        """Chat messages → prompt ids with the chat template ``adapter`` was trained with (lorakit
        train --chat-template), else the tokenizer's, else DEFAULT_CHAT_TEMPLATE; the same function
        training tokenizes chat prompts with (one BOS, however the template is written)."""
        source = self.sources.get(adapter) if adapter else None
        template = saved_template(source) if source else None
        return chat_prompt_ids(self.tokenizer, messages, 10**9, template)  # check_generation counts the tokens

    def check_generation(self, prompt_ids: list[int], max_tokens: int) -> None:
        if self.task != "causal-lm":
            raise ServeError(400, "this server serves a classification model; use POST /v1/classify",
                             "invalid_request")
        if not prompt_ids:
            raise ServeError(400, "the prompt is empty (no tokens to continue from)", param="prompt")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                             f"{self.max_prompt_tokens}: shorten the prompt", "context_length_exceeded", "prompt")
        if max_tokens > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.max_tokens_limit}: "
                             f"ask for at most {self.max_tokens_limit}", "max_tokens_exceeded", "max_tokens")
        if self.max_length and len(prompt_ids) + max_tokens > self.max_length:
            raise ServeError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.max_length} tokens: ask for at most "
                             f"{max(self.max_length - len(prompt_ids), 0)} tokens or shorten the prompt",
                             "context_length_exceeded", "max_tokens")

    def encode_inputs(self, texts: list[str]) -> list[list[int]]:
        if self.task != "classify":
            raise ServeError(400, "this server serves a causal LM; /v1/classify needs a classification model",
                             "invalid_request")
        limit = min(self.max_prompt_tokens, self.max_length or self.max_prompt_tokens)
        out = []
        for i, text in enumerate(texts):
            ids = list(self.tokenizer.encode(text, add_special_tokens=True))
            if len(ids) > limit:
                raise ServeError(400, f"input {i} has {len(ids)} tokens; the limit is {limit}",
                                 "context_length_exceeded", "input")
            out.append(ids or [self.pad_id])
        return out

    # -- the worker thread's side ------------------------------------------------------------
    def run_batch(self, jobs: list[Job], take: Callable[[int], list[Job]] | None = None) -> None:
        """Run a batch (in the batcher's worker thread). ``take(busy_rows)`` hands out more queued
        jobs; they join the running generation between decoding steps (continuous batching)."""
        try:
            with self.lock, torch.no_grad():
                self.metrics.batches += 1
                self.adapters.between_steps(())
                try:
                    generation = self._admit(jobs)
                    if generation:
                        self._generate(generation, take)
                finally:
                    self.adapters.between_steps(())  # every row has left: free what was unloaded
        finally:
            self.adapters.pump()  # a change queued while this batch let go of the lock

    def _admit(self, jobs: list[Job]) -> list[GenerationJob]:
        """Fail jobs for unknown adapters, answer classification jobs now; the generation jobs."""
        self.metrics.jobs += len(jobs)
        live = []
        for job in jobs:
            try:
                job.version = self.require(job.adapter)  # the version it runs on until it ends
            except ServeError as exc:
                job.fail(exc.status, exc.message, exc.code)
                continue
            live.append(job)
        classification = [j for j in live if isinstance(j, ClassificationJob)]
        if classification:
            self._classify(classification)
        return [j for j in live if isinstance(j, GenerationJob)]

    def _forward(self, names: list[str], cache=None, **inputs):
        if "use_cache" in inputs:  # decoding: only the last position's logits are needed
            inputs[self._cache_arg] = cache
            if self._logits_to_keep:
                inputs["logits_to_keep"] = 1
        self.metrics.forward_calls += 1
        self.metrics.forward_rows += len(names)
        self.metrics.max_rows = max(self.metrics.max_rows, len(names))
        self.metrics.adapters_per_forward += len(set(names))
        return self.model(adapter_names=names, **inputs)

    def _generate(self, jobs: list[GenerationJob], take: Callable[[int], list[Job]] | None) -> None:
        batch = self._step(self._prefill(jobs))
        while batch is not None:
            self.adapters.between_steps([row.job.version for row in batch.rows])
            if take is not None and mergeable(batch.cache):
                joining = self._admit(take(len(batch.rows)))
                if joining:
                    self.metrics.joined += len(joining)
                    batch = merge_batches(batch, self._step(self._prefill(joining)))
            batch = self._step(batch)

    def _prefill(self, jobs: list[GenerationJob]) -> DecodeBatch:
        """Left-padded prompts with their attention mask and positions (padding changes nothing)."""
        rows = [Row(job, self) for job in jobs]
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[i, width - n:] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        return DecodeBatch(rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None)

    def _step(self, batch: DecodeBatch | None) -> DecodeBatch | None:
        """One forward for every row, one token each; finished rows leave. None when all finished."""
        if batch is None:
            return None
        rows = batch.rows
        out = self._forward([r.job.version for r in rows], batch.cache, input_ids=batch.ids,
                            attention_mask=batch.mask, position_ids=batch.position, use_cache=True)
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        logits = out.logits[:, -1, :].float()
        tokens = logits.argmax(-1)
        keep = []
        for i, row in enumerate(rows):
            if row.job.cancelled:
                continue
            token = row.choose(logits[i]) if row.generator is not None else int(tokens[i])
            tokens[i] = token
            self.metrics.generated_tokens += 1
            if row.step(token):
                keep.append(i)
        if not keep:
            return None
        mask, position = batch.mask, batch.position
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long)
            cache.batch_select_indices(index)
            rows = [rows[i] for i in keep]
            tokens, mask, position = tokens[index], mask[index], position[index]
            mask, cache = trim_left_padding(mask, cache)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        return DecodeBatch(rows, tokens.unsqueeze(1), mask, position[:, -1:] + 1, cache)

    def _classify(self, jobs: list[ClassificationJob]) -> None:
        inputs = [(job, ids) for job in jobs for ids in job.inputs]
        width = max(len(ids) for _, ids in inputs)
        batch = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, (_, ids) in enumerate(inputs):
            batch[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        names = [job.version for job, _ in inputs]
        logits = self._forward(names, input_ids=batch, attention_mask=mask).logits.float()
        probs = torch.softmax(logits, dim=-1)
        row = 0
        for job in jobs:
            labels = self.label_names.get(job.adapter) or [str(i) for i in range(probs.shape[-1])]
            results = []
            for index in range(len(job.inputs)):
                p = probs[row]
                best = int(p.argmax())
                results.append({"index": index, "label": labels[best], "label_id": best,
                                "probabilities": {labels[k]: float(p[k]) for k in range(len(labels))}})
                row += 1
            job.emit(Classified(results, sum(len(ids) for ids in job.inputs)))


def check_name(name: str, error: type[Exception] | None = None) -> None:
    """Served names: no '#' (:mod:`lorakit.serve.adapters` names versions with it), no '.' (the model's rule)."""
    if name == BASE or not NAME_RULE.match(name or "") or name.endswith("__incoming"):
        message = (f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' (at most 128, not "
                   f"{BASE!r})")
        if error is not None:
            raise error(message)
        raise ServeError(400, message, "invalid_adapter_name", "name")


def default_chat_text(messages: list[dict[str, str]]) -> str:
    """DEFAULT_CHAT_TEMPLATE rendered without Jinja (identical text)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def adapter_heads(folder: Path) -> tuple[list[int], dict[str, Any]]:
    """(label counts of the classification heads an adapter file carries, its lorakit metadata)."""
    import json

    try:
        header = read_header(folder / WEIGHTS_NAME)
    except (OSError, SafetensorsError) as exc:  # a missing or damaged file: the loader gives the full story
        raise AdapterFileError(f"{folder / WEIGHTS_NAME} cannot be read ({exc}); the file is corrupt or truncated") \
            from exc
    metadata = header.metadata
    sizes = [entry.shape[0] for k, entry in header.entries.items()
             if k.endswith(".weight") and entry.shape and any(part in CLASSIFIER_HEADS for part in k.split(".")[2:-1])]
    try:
        lorakit_meta = json.loads(metadata.get("lorakit", "{}"))
    except json.JSONDecodeError:
        lorakit_meta = {}
    return sizes, lorakit_meta if isinstance(lorakit_meta, dict) else {}


def _first_int(*values) -> int:
    for v in values:
        if isinstance(v, int):
            return v
        if isinstance(v, list | tuple) and v and isinstance(v[0], int):
            return v[0]
    return 0


def _eos_ids(tokenizer, model) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(model.config, "eos_token_id", None)]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _max_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0

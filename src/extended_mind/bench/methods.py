"""The methods compared, all on one loaded model and one prompt template.

A method is named by a spec: `emt`, `rag`, `context`, `yarn`, `emt+rag` or `none`, optionally with settings in
brackets, e.g. `emt[topk=20,position_policy=zero]` or `rag[chunk_tokens=300,top=8]`. Every method builds the same
completion-style prompt: (pasted text,) the question, then the start of the answer; only what it pastes and whether
the model reads the document from memory differ."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

import torch

from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench.items import Item
from extended_mind.bench.rag import Retriever
from extended_mind.bench.yarn import yarn_factor, yarn_scaling
from extended_mind.engine.memorize import sink_token_id
from extended_mind.engine.mind import ExtendedMind
from extended_mind.engine.options import shared_options
from extended_mind.memory.memory import Memory

METHODS = ("emt", "rag", "context", "yarn", "emt+rag", "none")
# emt[...] settings: how a question reads memory (engine/options.py), and the harness's own: stride (memorizing),
# layers (memory_layers as a range) and chunk (scoring).
EMT_SETTINGS = {
    **{name: str if meta["choices"] else meta["kind"] for name, _, meta in shared_options()},
    "stride": int, "layers": str, "chunk": int,
}  # fmt: skip
# Settings with another name in ExtendedMind.generate/logits (layers "10-29" -> memory_layers [10, ..., 29]).
_RENAMED = {"layers": "memory_layers"}
RAG_SETTINGS = {"chunk_tokens": int, "top": int}
ALLOWED = {
    "emt": EMT_SETTINGS, "rag": RAG_SETTINGS, "emt+rag": {**EMT_SETTINGS, **RAG_SETTINGS}, "context": {},
    "yarn": {}, "none": {},
}  # fmt: skip
_SPEC = re.compile(r"^([a-z+]+)(?:\[(.*)\])?$")
# Tokens an answer without its prefix may spend before the answer proper: chat replies restate the question first
# ("Aurelie Orsk is the lighthouse keeper of Morrow Point. Aurelie Orsk has kept the light there since"); with the
# prefix's length alone, 3 of 4 wrong 10-profile chat answers were cut off one word before the year.
PREAMBLE_TOKENS = 32


def layer_range(text: str) -> list[int]:
    """Parse a layer range: "10-29" -> [10, ..., 29]; "3" -> [3]."""
    first, _, last = text.partition("-")
    try:
        return list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ExtendedMindError(f"layers look like FIRST-LAST, e.g. 10-29; got {text!r}") from None


def emt_options(settings: dict, allowed: tuple[str, ...] | None = None) -> dict:
    """The keyword arguments for ExtendedMind from a method's settings (stride is for memorizing, not asking; chunk
    for scoring, passed only when `allowed` names it)."""
    out = {}
    skip = {"stride"} if allowed is not None else {"stride", "chunk"}  # chunk: scoring (logits) only
    for key, value in settings.items():
        if key in EMT_SETTINGS and key not in skip and (allowed is None or key in allowed):
            out[_RENAMED.get(key, key)] = layer_range(value) if key == "layers" else value
    return out


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.settings:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in sorted(self.settings.items()))}]"


def parse_method(spec: str) -> MethodSpec:
    """`emt[topk=20,similarity_threshold=0.25]` -> MethodSpec("emt", {...}); a clear error for unknown names or
    settings and for values of the wrong type ("none" sets a float setting to None)."""
    m = _SPEC.match(spec.strip())
    if not m or m.group(1) not in METHODS:
        raise ExtendedMindError(f"unknown method {spec!r}; choose from {METHODS} (settings in brackets)")
    name, body = m.group(1), m.group(2)
    settings = {}
    for part in filter(None, (p.strip() for p in (body or "").split(","))):
        key, _, raw = part.partition("=")
        kind = ALLOWED[name].get(key.strip())
        if kind is None:
            raise ExtendedMindError(f"method {name} has no setting {key.strip()!r}; it has {sorted(ALLOWED[name])}")
        raw = raw.strip()
        try:
            settings[key.strip()] = None if raw.lower() == "none" and kind is float else kind(raw)
        except ValueError:
            raise ExtendedMindError(f"setting {key.strip()} of {name} must be {kind.__name__}, got {raw!r}") from None
        if key.strip() == "layers":
            layer_range(raw)  # a malformed range fails here, not on every item of a long run
    return MethodSpec(name, settings)


def prompt_text(item: Item, pasted: str = "", prefix: bool = True) -> str:
    """The one completion template every method uses: the question, then the answer prefix, or without `prefix`
    "Question: ...\nAnswer:"."""
    block = f"{pasted.strip()}\n\n" if pasted.strip() else ""
    if not prefix:
        return f"{block}Question: {item.question}\nAnswer:"
    return f"{block}{item.question}\n{item.answer_prefix}"


class Harness:
    """One model, the embedding model when RAG is used, and the memory of the document being asked about (built
    once per document and stride, shared by every memory method)."""

    def __init__(self, mind: ExtendedMind, chat: bool = False, prefix: bool = True):
        self.mind = mind
        self.chat = chat  # questions in the chat template, the answer prefix starting the reply
        self.prefix = prefix  # the item's answer prefix starts the answer (else the model starts it itself)
        self._memories: dict[tuple[str, int | None], Memory] = {}
        self._retriever: Retriever | None = None
        self._context_answer: tuple[str, dict] = ("", {})  # yarn on a document that fits is `context`: reused

    def memory(self, document: str | list[str], stride: int | None) -> tuple[Memory, float]:
        """(memory of `document` (one text, or several memorized as separate documents), seconds spent memorizing
        now: 0 when it was already built)."""
        texts = [document] if isinstance(document, str) else list(document)
        key = (hashlib.sha1("\x00".join(texts).encode()).hexdigest(), stride)
        if key not in self._memories:
            self._memories = {k: v for k, v in self._memories.items() if k[0] == key[0]}  # one document at a time
            start = time.perf_counter()
            self._memories[key] = self.mind.memorize(texts, stride=stride, progress=False)
            return self._memories[key], time.perf_counter() - start
        return self._memories[key], 0.0

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = Retriever(self.mind.embedder, self.mind.tokenizer)  # one embedding model for all
        return self._retriever

    def count(self, text: str) -> int:
        return len(self.mind.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- answering ----

    def answer(self, spec: MethodSpec, item: Item) -> dict:
        """Run one method on one item: {prediction, seconds, ...details}."""
        start = time.perf_counter()
        details: dict = {}
        s = spec.settings
        pasted, memory, options = "", None, {}
        if spec.name in ("rag", "emt+rag"):
            separator = item.meta.get("rag_units")  # units such as demonstrations are retrieved whole
            query = item.question if separator else f"{item.question} {item.answer_prefix}"
            chunks = self.retriever.retrieve(item.document, query, s.get("chunk_tokens", 500), s.get("top", 5),
                                             separator)  # fmt: skip
            pasted = (separator or "\n\n").join(chunks)
        if spec.name in ("emt", "emt+rag"):  # separate documents (the pair task) stay separate in memory
            texts = item.meta.get("documents", item.document)
            memory, details["memorize_seconds"] = self.memory(texts, s.get("stride"))
            options = emt_options(s)
        if spec.name in ("context", "yarn"):
            pasted, details = self._fit_document(item, spec.name == "yarn")
            if details.get("yarn_factor") == 1.0 and self._context_answer[0] == item.id:
                return {**self._context_answer[1], **details, "same_as_context": True}  # it fits: yarn is off
        factor = details.get("yarn_factor", 1.0)
        if self.chat:
            question = f"{pasted.strip()}\n\n{item.question}".strip()
            prompt = {"prompt": question, "chat": True, "answer_prefix": item.answer_prefix if self.prefix else ""}
        else:
            prompt = {"prompt": prompt_text(item, pasted, self.prefix), "chat": False}
        if "choices" in item.meta:  # a classification: the answer is one of these tokens
            options["logit_bias"] = {t: 100.0 for t in item.meta["choices"]}
        budget = self.budget(item)
        with yarn_scaling(self.mind.model, factor):
            result = self.mind.generate(memory=memory, max_new_tokens=budget, **prompt, **options)
        details["prompt_tokens"] = result.prompt_tokens
        details["uncertainty_retrievals"] = len(result.retrievals)
        if result.blocks_read is not None:
            details["blocks_read"] = result.blocks_read
        if memory is not None and result.citations:
            details["top_citation"] = result.citations[0].text[:160]
        if result.blocks_read is not None and item.depth is not None:  # a fact placed in the document
            read = " ".join(p.text for p in result.passages).lower()  # selection apart from reading
            details["answer_read"] = any(a.lower() in read for a in item.answers)
            top = result.citations[0].text.lower() if result.citations else ""
            details["answer_cited"] = any(a.lower() in top for a in item.answers)  # the top citation holds it
        answer = {"prediction": result.text, "seconds": time.perf_counter() - start, **details}
        if spec.name == "context" and not details.get("truncated"):
            self._context_answer = (item.id, answer)
        return answer

    def budget(self, item: Item) -> int:
        """New tokens an answer to `item` may take: the item's own, plus without the answer prefix room for the
        sentence the model writes before the answer (classifications answer in their first token either way)."""
        if self.prefix or "choices" in item.meta:
            return item.max_new_tokens
        return item.max_new_tokens + max(PREAMBLE_TOKENS, self.count(item.answer_prefix) + 2)

    def _fit_document(self, item: Item, yarn: bool) -> tuple[str, dict]:
        """The document for `context` (cut to the part nearest the question when it does not fit) or `yarn` (whole,
        with the scaling factor that makes it fit)."""
        window = self.mind.context_window
        # template, question, answer and BOS, plus a margin: cut text can re-tokenize a few tokens longer
        frame = self.count(prompt_text(item, "x")) + self.budget(item) + 16 + (64 if self.chat else 0)
        ids = self.mind.tokenizer(item.document, add_special_tokens=False)["input_ids"]
        if yarn:
            return item.document, {"yarn_factor": yarn_factor(len(ids) + frame, window), "truncated": False}
        budget = window - frame
        if len(ids) <= budget:
            return item.document, {"truncated": False}
        return self.mind.tokenizer.decode(ids[-budget:]), {"truncated": True, "kept_tokens": budget}

    # ---- perplexity ----

    def perplexity(self, spec: MethodSpec, prefix: list[int], local: list[int]) -> dict | None:
        """Mean negative log-likelihood of `local[1:]` after `prefix`, as each method sees it: `none` only `local`
        (truncation), `context` as much prefix as fits the window, `yarn` all of it with scaling, `emt` the prefix
        in memory. None for methods that do not apply (RAG has no question to retrieve for)."""
        if spec.name in ("rag", "emt+rag"):
            return None
        start = time.perf_counter()
        sink = sink_token_id(self.mind.tokenizer)
        head = [sink] if sink is not None else []
        window, details = self.mind.context_window, {}
        memory, context = None, []
        if spec.name == "emt":
            text = self.mind.tokenizer.decode(prefix)
            memory, details["memorize_seconds"] = self.memory(text, spec.settings.get("stride"))
        elif spec.name == "context":
            keep = max(0, window - len(head) - len(local))
            context = prefix[len(prefix) - keep :] if keep else []
            details["truncated"] = len(context) < len(prefix)
        elif spec.name == "yarn":
            context = prefix
            details["yarn_factor"] = yarn_factor(len(head) + len(prefix) + len(local), window)
        ids = torch.tensor([head + context + local])
        options = emt_options(spec.settings, ("topk", "position_policy", "similarity_threshold", "ranking", "search",
                                              "layers", "retrieval", "blocks", "block_size", "block_gate",
                                              "memory_heads", "chunk"))  # fmt: skip
        with yarn_scaling(self.mind.model, details.get("yarn_factor", 1.0)):
            logits = self.mind.logits(ids, memory=memory, **options)[0, -len(local) : -1].float()
        targets = torch.tensor(local[1:], device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits, targets).item()
        return {"nll": nll, "perplexity": float(torch.exp(torch.tensor(nll))), "tokens": len(local) - 1,
                "seconds": time.perf_counter() - start, **details}  # fmt: skip

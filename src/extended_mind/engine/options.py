"""Generation options: one frozen, self-validating object (`GenerationOptions`).

Every option is declared once, here, with its default, its bounds or choices and its help. The CLI's flags
(cli/parser.py), the server's request fields (server/schemas.py) and the harness's `emt[name=value]` settings
(bench/methods.py) are derived from the options marked `shared` (how a question reads memory); adding an option
means adding a field below."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from extended_mind.base.errors import ExtendedMindError
from extended_mind.base.prompting import DEFAULT_MEMORY_AT, MEMORY_AT
from extended_mind.engine.blocks import DEFAULT_MIN_RELEVANCE, DEFAULT_OUTLIER, DEFAULT_WORDS_OVERRIDE
from extended_mind.engine.positions import POSITION_POLICIES
from extended_mind.retrieval.index import DEFAULT_APPROX_THRESHOLD, IndexSettings

DEFAULT_TOPK = 10
MAX_TOPK = 1024
DEFAULT_RANKING = "logit"
DEFAULT_POSITION_POLICY = "stored"
RETRIEVAL_MODES = ("blocks", "tokens")
DEFAULT_RETRIEVAL = "blocks"
DEFAULT_BLOCKS = 8
DEFAULT_BLOCK_SIZE = 64
DEFAULT_BLOCK_GATE = 0.5
DEFAULT_BLOCK_RELEVANCE = DEFAULT_MIN_RELEVANCE
DEFAULT_BLOCK_WORDS = DEFAULT_WORDS_OVERRIDE
DEFAULT_BLOCK_OUTLIER = DEFAULT_OUTLIER
# How block memory chooses blocks: "heads", the retrieval heads' attention from the question (what to copy);
# "embedding", the blocks whose text is nearest the question's by a sentence embedding model (what is like it: the
# demonstrations of many-shot in-context learning), always the `blocks` nearest, with no relevance test.
BLOCK_CHOICES = ("heads", "embedding")
DEFAULT_BLOCK_CHOICE = "heads"
# Block memory and a memory that fits the window: "fits" reads it whole, as the text pasted at the same place with
# a blank line before the question (equal to pasting it); "unread" (the default): its blocks are chosen as for any
# memory, and it is read whole when the question draws none of them but asks about it (engine/words.py `asks_about`:
# the question's words together in one of its sentences; a question the relevance test missed, not a general one);
# "never": its blocks are chosen as for any memory.
WHOLE_CHOICES = ("fits", "unread", "never")
BLOCK_BREAKS = ("auto", "surer", "always", "never", "question")
DEFAULT_BLOCK_BREAK = "auto"
DEFAULT_WHOLE = "unread"
# A quote is followed where the model's likeliest next token has a probability under this (engine/quoting.py):
# the prose passkey's definitions won at 0.35-0.42, answers the model is sure of go on as they were.
DEFAULT_QUOTE_THRESHOLD = 0.5
MEMORY_HEADS = ("retrieval", "all")
# Rows of `logits` input scored per chunk in block mode: each chunk reads the blocks its own rows chose.
DEFAULT_SCORING_CHUNK = 64
DEFAULT_STRIDE = 512
DEFAULT_WINDOW = 2048
DEFAULT_TOPK_STEP = 2
RANKINGS = ("logit", "cosine")
CITATION_WEIGHTINGS = ("attention_value", "attention")
SEARCH_MODES = ("auto", "exact", "approximate")
DEFAULT_SEARCH = "auto"


def _option(default: Any, help: str, *, kind: type | None = None, minimum: float | None = None,
            maximum: float | None = None, choices: tuple | None = None, shared: bool = False,
            label: str | None = None, why_maximum: str = "", request_maximum: float | None = None) -> Any:  # fmt: skip
    """A dataclass field with what the checks, the CLI, the server and the harness need to know about it.
    `request_maximum`: a bound for server requests only, where the Python API takes any value (a threshold no
    question reaches is a way to turn a feature off)."""
    kind = kind or (str if choices else type(default))
    meta = {"help": help, "kind": kind, "minimum": minimum, "maximum": maximum, "choices": choices,
            "shared": shared, "label": label, "why_maximum": why_maximum,
            "request_maximum": request_maximum if request_maximum is not None else maximum}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GenerationOptions:
    """How one prompt is answered. Construct with keyword arguments (`GenerationOptions.of(...)`); an option out of
    its bounds or choices raises ExtendedMindError naming it."""

    # ---- how a question reads memory (shared with the CLI, the server and the harness) ----
    retrieval: str = _option(DEFAULT_RETRIEVAL, "blocks: the retrieval heads choose memory blocks that every head "
                             "reads as context; tokens: every head retrieves its own top-k memory tokens",
                             choices=RETRIEVAL_MODES, shared=True)  # fmt: skip
    blocks: int = _option(DEFAULT_BLOCKS, "memory blocks read", minimum=0, maximum=256, shared=True)
    block_size: int = _option(DEFAULT_BLOCK_SIZE, "tokens per memory block", minimum=1, maximum=1024, shared=True)
    block_gate: float = _option(DEFAULT_BLOCK_GATE, "read a block only if its score is this fraction of the best "
                                "block's", minimum=0, maximum=1, shared=True)  # fmt: skip
    block_relevance: float = _option(DEFAULT_BLOCK_RELEVANCE, "read a block only if the question draws it this many "
                                     "spreads above what unrelated questions do; 0 reads the best blocks whatever the "
                                     "question", minimum=0, request_maximum=1000, shared=True)  # fmt: skip
    block_words: float = _option(DEFAULT_BLOCK_WORDS, "read a block the relevance test passes only if it shares a "
                                 "word with the question (stopwords aside), unless the question draws it this many "
                                 "spreads out; 0: no word test", minimum=0, request_maximum=1000,
                                 shared=True)  # fmt: skip
    block_outlier: float = _option(DEFAULT_BLOCK_OUTLIER, "also read a block below the relevance bar (but at least "
                                   "1.5 spreads) that stands this many spreads above the question's other blocks; "
                                   "0: not", minimum=0, request_maximum=1000, shared=True)  # fmt: skip
    whole: str = _option(DEFAULT_WHOLE, "fits: a memory that fits the window is read whole, as its text pasted "
                         "before the question with a blank line after it; unread: its blocks are chosen, and it is "
                         "read whole when the question draws none but its words meet in one of its sentences; "
                         "never: its blocks are chosen",
                         choices=WHOLE_CHOICES, shared=True)  # fmt: skip
    block_break: str = _option(DEFAULT_BLOCK_BREAK, "a blank line between the chosen blocks and the question, as "
                               "pasted text has: surer: with and without it (and, for a memory that fits the window, "
                               "the memory read whole) the first 16 answer tokens are tried and the layout the model "
                               "is surest of is kept (shorter answers: without); question: the blocks' text read "
                               "after the question, then the question again; auto: question, but surer for one-token "
                               "answers (labels) and with uncertainty_threshold",
                               choices=BLOCK_BREAKS, shared=True)  # fmt: skip
    block_choice: str = _option(DEFAULT_BLOCK_CHOICE, "how blocks are chosen: by the retrieval heads (what to copy), "
                                "or by a sentence embedding's similarity to the question (examples like it, as in "
                                "many-shot in-context learning; needs `extended-mind data fetch --only minilm`)",
                                choices=BLOCK_CHOICES, shared=True)  # fmt: skip
    quote_threshold: float = _option(DEFAULT_QUOTE_THRESHOLD, "a greedy answer whose last tokens quote a block it "
                                     "reads goes on with the block's next token where the model's likeliest token "
                                     "is less likely than this and the block's is among its 5 likeliest; 0: never",
                                     minimum=0, maximum=1, shared=True)  # fmt: skip
    memory_heads: str | None = _option(None, "heads that retrieve from memory: the calibrated retrieval heads or all "
                                       "(blocks: retrieval; tokens: all)", choices=MEMORY_HEADS,
                                       shared=True)  # fmt: skip
    memory_at: str = _option(DEFAULT_MEMORY_AT, "where block memory is read: before the question or before the "
                             "answer", choices=MEMORY_AT, shared=True)  # fmt: skip
    topk: int = _option(DEFAULT_TOPK, "memory tokens ranked per query head and token; 0: no memory", minimum=0,
                        maximum=MAX_TOPK, shared=True, why_maximum="memory tokens each head ranks per query token: "
                        "more only spreads the retrieval heads' choice thin and costs memory per query")  # fmt: skip
    uncertainty_threshold: float | None = _option(None, "entropy (nats) above which a step is recomputed with topk + "
                                                  "topk_step memories", kind=float, minimum=0, request_maximum=100,
                                                  shared=True)  # fmt: skip
    topk_step: int = _option(DEFAULT_TOPK_STEP, "extra memories (or blocks) on re-retrieval", minimum=0, maximum=1024,
                             shared=True)  # fmt: skip
    similarity_threshold: float | None = _option(None, "drop memories with cosine <= this", kind=float, minimum=-1,
                                                 maximum=1, shared=True)  # fmt: skip
    position_policy: str = _option(DEFAULT_POSITION_POLICY, "token retrieval: rotary positions of retrieved memories",
                                   choices=POSITION_POLICIES, shared=True, label="position policy")  # fmt: skip
    ranking: str = _option(DEFAULT_RANKING, "how memories are ranked", choices=RANKINGS, shared=True)
    search: str = _option(DEFAULT_SEARCH, f"top-k search: auto is approximate from {DEFAULT_APPROX_THRESHOLD:,} memory "
                          "tokens on", choices=SEARCH_MODES, shared=True)  # fmt: skip
    # ---- the Python API's own ----
    max_new_tokens: int = _option(128, "longest answer in tokens", minimum=1)
    chat: bool = _option(True, "wrap the prompt in the model's chat template")
    answer_prefix: str = _option("", "text the answer starts with (the result's text excludes it)")
    memory_layers: tuple[int, ...] | None = _option(None, "layers that read memory (None: all)", kind=tuple)
    temperature: float = _option(0.0, "0: greedy", minimum=0)
    seed: int | None = _option(None, "sampling seed", kind=int)
    stop: tuple[str, ...] = _option((), "strings that end the answer", kind=tuple)
    citation_weighting: str = _option("attention_value", "attention_value: probability x value norm; attention: "
                                      "the probability alone", choices=CITATION_WEIGHTINGS,
                                      label="citation weighting")  # fmt: skip
    approx_threshold: int = _option(DEFAULT_APPROX_THRESHOLD, "memory tokens from which search='auto' is "
                                    "approximate", minimum=0)  # fmt: skip
    index: IndexSettings | None = _option(None, "approximate search: IVF cells, probes, candidates", kind=IndexSettings)
    logit_bias: tuple[tuple[int, float], ...] = _option((), "token id -> bias in [-100, 100] added before each choice",
                                                        kind=tuple)  # fmt: skip
    top_logprobs: int = _option(0, "alternatives reported with each token's log-probability", minimum=0)

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """`options` (default: the defaults) with `changes`; an unknown name raises ExtendedMindError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ExtendedMindError(f"unknown option {unknown[0]!r}; the options are {sorted(names)}")
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options is not None else {}
        return cls(**{**base, **changes})

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.default, f.metadata)
        normal = {
            "stop": tuple(x for x in (self.stop or ()) if x) if not isinstance(self.stop, str) else (self.stop,),
            "memory_layers": None if self.memory_layers is None else tuple(self.memory_layers),
            "logit_bias": _logit_bias(self.logit_bias),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)


def shared_options() -> Iterator[tuple[str, Any, dict]]:
    """(name, default, metadata) of each option the CLI, the server and the harness take."""
    for f in fields(GenerationOptions):
        if f.metadata["shared"]:
            yield f.name, f.default, dict(f.metadata)


def _check(name: str, value: Any, default: Any, meta: Any) -> None:
    if value is None and default is None:
        return
    kind, choices, label = meta["kind"], meta["choices"], meta["label"] or name
    if choices is not None:
        if value not in choices:
            raise ExtendedMindError(f"unknown {label} {value!r}; choose one of {choices}")
        return
    if kind is int:
        if meta["minimum"] is not None:
            check_int(name, value, int(meta["minimum"]))
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ExtendedMindError(f"{name} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ExtendedMindError(f"{name} must be a finite number, got {value!r}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ExtendedMindError(f"{name} must be a number >= {meta['minimum']}, got {value!r}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise ExtendedMindError(f"{name} must be a number <= {meta['maximum']}, got {value!r}")
    elif kind is bool and not isinstance(value, bool):
        raise ExtendedMindError(f"{name} must be true or false, got {value!r}")
    elif kind is str and not isinstance(value, str):
        raise ExtendedMindError(f"{name} must be a string, got {type(value).__name__}")
    elif kind is IndexSettings and not isinstance(value, IndexSettings):
        raise ExtendedMindError(f"{name} must be an IndexSettings, got {type(value).__name__}")
    elif kind is tuple and name != "logit_bias" and not isinstance(value, (list, tuple, str)):
        raise ExtendedMindError(f"{name} must be a list, got {type(value).__name__}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        why = f" ({meta['why_maximum']})" if meta["why_maximum"] else ""
        raise ExtendedMindError(f"{name} must be at most {meta['maximum']}{why}, got {value!r}")


def _logit_bias(logit_bias: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's rules: token ids (ints, or their strings as JSON sends them) to biases in [-100, 100]; the ids are
    checked against the vocabulary by the model (`ExtendedMind.stream`)."""
    if not logit_bias:
        return ()
    items = logit_bias.items() if isinstance(logit_bias, dict) else logit_bias
    if not isinstance(logit_bias, (dict, tuple)):
        raise ExtendedMindError(f"logit_bias must map token ids to biases, got {type(logit_bias).__name__}")
    out = []
    for token, value in items:
        try:
            tid, bias = int(token), float(value)
        except (TypeError, ValueError):
            raise ExtendedMindError(f"logit_bias entries are token id: number, got {token!r}: {value!r}") from None
        if not -100 <= bias <= 100:
            raise ExtendedMindError(f"logit_bias values must be in [-100, 100], got {bias} for token {tid}")
        out.append((tid, bias))
    return tuple(out)


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExtendedMindError(f"{name} must be an integer >= {minimum}, got {value!r}")

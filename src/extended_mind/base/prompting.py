"""Prompts as token ids, with the two places block memory needs to know: where the question starts (its rows
choose the blocks) and where the memory is read (the slots go there).

By default (`memory_at="question"`) the memory is read right before the question: after the leading special
tokens of a completion prompt, and in a chat at the start of the user's message, as a pasted document would be.
`memory_at="answer"` reads it between the question and the answer instead (before `answer_prefix` when there is
one, else before the last line of a multi-line completion prompt, and in a chat after the user's message): the
evidence is then what the model reads last. On 54 harness items (SmolLM2, a development sweep: counterfactual QA,
prose passkeys, RULER, needles, two-to-ten similar documents, general questions) "question" answered 43 and
"answer" 35: late memory helped counterfactual QA by one item but hijacked general questions (12 of 20 right
against 19 of 20).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from extended_mind.base.errors import ExtendedMindError

MEMORY_AT = ("answer", "question")


DEFAULT_MEMORY_AT = "question"


@dataclass
class EncodedPrompt:
    ids: list[int]
    memory_at: int  # block memory's slots go right before ids[memory_at:]
    asks_from: int  # ids[asks_from:asks_to] are the rows whose retrieval heads choose the blocks: the question's
    asks_to: int | None = None  # own words (None: to the end), not the chat template's or the answer prefix's


def paragraph_break(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens of a blank line between two words, as the tokenizer cuts it inside a text (alone, "\n\n" is often
    one token; before a word, two)."""
    ids = tokenizer("a\n\nb", add_special_tokens=False)["input_ids"]
    return list(ids[1:-1])


def with_tokens_at(prompt: EncodedPrompt, at: int, tokens: list[int]) -> EncodedPrompt:
    """`prompt` with `tokens` inserted before ids[at] (the memory still goes at `memory_at`): rows from `at` on shift,
    the question's with them."""
    n = len(tokens)
    asks_from = prompt.asks_from + n if prompt.asks_from >= at else prompt.asks_from
    asks_to = prompt.asks_to + n if prompt.asks_to is not None and prompt.asks_to > at else prompt.asks_to
    return EncodedPrompt(prompt.ids[:at] + list(tokens) + prompt.ids[at:], prompt.memory_at, asks_from, asks_to)


def _token_at(offsets: list[tuple[int, int]], char: int, floor: int) -> int:
    """Index of the first token (from `floor` on) that starts at or after character `char`."""
    for i in range(floor, len(offsets)):
        start, end = offsets[i]
        if end > start and start >= char:
            return i
    return len(offsets)


def leading_special(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    special = set(tokenizer.all_special_ids)
    return next((i for i, t in enumerate(ids) if t not in special), len(ids))


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], chat: bool, answer_prefix: str, memory_at: str
) -> EncodedPrompt:
    """Token ids of `prompt` (in the chat template when `chat` and the tokenizer has one) followed by
    `answer_prefix`, and where the question starts and the memory goes (`memory_at`: "answer" or "question")."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        head = leading_special(tokenizer, list(prompt))  # given as ids: memory after the leading special tokens
        return EncodedPrompt(list(prompt), head, head, None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ExtendedMindError("prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        template = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        text, special = template + answer_prefix, False
        asks = template.rfind(prompt)
        answer = asks + len(prompt)  # after the user's message, before the end of the turn
    else:
        sep = " " if answer_prefix and not prompt.endswith((" ", "\n")) else ""
        text, special = prompt + sep + answer_prefix, True
        asks = 0
        if answer_prefix:
            answer = len(prompt + sep)
        else:  # the last line of a multi-line prompt is where the answer starts
            body = prompt.rstrip()
            answer = body.rfind("\n") + 1 if "\n" in body else 0
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    floor = leading_special(tokenizer, ids)
    asks_from = _token_at(offsets, asks, floor)
    asks_to = max(asks_from + 1, _token_at(offsets, answer, floor)) if answer > asks else None
    at = asks_from if memory_at == "question" else max(asks_from, _token_at(offsets, answer, floor))
    return EncodedPrompt(ids, at, asks_from, asks_to)


def encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], memory_at: str, answer_prefix: str = ""
) -> EncodedPrompt:
    """A conversation ({"role", "content"} dicts) ready for the assistant's answer: the tokenizer's chat template,
    or "Role: content" lines when it has none, then `answer_prefix` (the start of the reply). The question is the
    last user message; the memory goes after it ("answer") or before it ("question")."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        special = False
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        special = True
    text += answer_prefix
    asks = text.rfind(last)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    floor = leading_special(tokenizer, ids)
    asks_from = _token_at(offsets, asks, floor)
    asks_to = max(asks_from + 1, _token_at(offsets, asks + len(last), floor))
    at = asks_from if memory_at == "question" else max(asks_from, _token_at(offsets, asks + len(last), floor))
    return EncodedPrompt(ids, at, asks_from, asks_to)

"""Conversation memory: a chat whose oldest turns are memorized, not dropped, once they no longer fit the context.

Each turn that leaves the context becomes a memory document "turn-<n>" ("User: ...\\nAssistant: ..."), so later
answers can still retrieve it, and cite it, through memory attention. With `history` the memorized turns are saved
to a directory after every change and loaded again when a session starts there, so a conversation can resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from extended_mind.base.errors import ExtendedMindError
from extended_mind.base.prompting import DEFAULT_MEMORY_AT, EncodedPrompt, encode_messages
from extended_mind.engine.decoding import GeneratedToken, GenerationResult
from extended_mind.memory.memory import Memory, is_saved_memory

if TYPE_CHECKING:
    from extended_mind.engine.mind import ExtendedMind, MemoryLike


class ChatSession:
    """A multi-turn chat with an optional document memory. `send` answers one message; `stream` yields its tokens.

    `max_context_tokens` caps the tokens the conversation may hold in context (default: the model's window);
    generation options (topk, max_new_tokens, position_policy, ...) apply to every turn."""

    def __init__(
        self,
        mind: ExtendedMind,
        memory: MemoryLike | list[MemoryLike] | None = None,
        system: str | None = None,
        max_context_tokens: int | None = None,
        history: str | Path | None = None,
        storage: str | None = None,
        **options,
    ):
        self.mind = mind
        self.documents = mind.as_memory(memory)
        self.system = system
        self.max_context_tokens = mind.context_window if max_context_tokens is None else max_context_tokens
        if not isinstance(self.max_context_tokens, int) or self.max_context_tokens < 1:
            raise ExtendedMindError(f"max_context_tokens must be a positive integer, got {max_context_tokens!r}")
        self.options = {"max_new_tokens": 128} | options
        if "chat" in options or "answer_prefix" in options:
            raise ExtendedMindError("a chat session always uses the chat template; chat/answer_prefix do not apply")
        mind.options(**self.options)  # a bad option fails here, not at the first message
        self.storage = storage
        self.turns: list[tuple[str, str]] = []  # (user, assistant) still in context
        self.history_path = Path(history) if history is not None else None
        self.history: Memory | None = None  # turns memorized so far
        if self.history_path is not None and is_saved_memory(self.history_path):
            self.history = mind.load_memory(self.history_path)
        self.memorized_turns = len(self.history.documents) if self.history else 0
        self.last: GenerationResult | None = None

    def _messages(self, message: str) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*out, {"role": "user", "content": message}]

    def _prompt(self, message: str) -> EncodedPrompt:
        memory_at = self.options.get("memory_at", DEFAULT_MEMORY_AT)
        return encode_messages(self.mind.tokenizer, self._messages(message), memory_at)

    def _memories(self) -> list[Memory]:
        return [m for m in (self.documents, self.history) if m is not None]

    def _fits(self, n_prompt: int) -> bool:
        need = n_prompt + self.options["max_new_tokens"]
        merged = Memory.merge(self._memories()) if self._memories() else None
        offset = self.mind.memory_positions(merged, **self.options)
        return need <= self.max_context_tokens and offset + need <= self.mind.context_window

    def _memorize_oldest_turn(self) -> None:
        user, assistant = self.turns.pop(0)
        turn_id = f"turn-{self.memorized_turns}"
        text = f"User: {user}\nAssistant: {assistant}"
        if self.history is None:
            self.history = self.mind.memorize(text, ids=[turn_id], storage=self.storage, progress=False)
        else:
            self.mind.add(self.history, text, ids=[turn_id])
        self.memorized_turns += 1
        if self.history_path is not None:
            self.history.save(self.history_path)

    def stream(self, message: str) -> Iterator[GeneratedToken]:
        """Answer `message`, yielding tokens as they come; the full result is in `.last` afterwards."""
        if not isinstance(message, str) or not message.strip():
            raise ExtendedMindError("message is empty")
        prompt = self._prompt(message)
        while not self._fits(len(prompt.ids)) and self.turns:
            self._memorize_oldest_turn()
            prompt = self._prompt(message)
        memories = self._memories()
        stream = self.mind.stream(prompt, memory=memories or None, **self.options)
        yield from stream
        self.last = stream.result
        self.turns.append((message, stream.result.text))

    def send(self, message: str) -> GenerationResult:
        for _ in self.stream(message):
            pass
        assert self.last is not None
        return self.last

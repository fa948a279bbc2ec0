"""Conversation memory: turns leaving the context go to memory, in order, and can be resumed from disk."""

from __future__ import annotations

import pytest

from extended_mind import ExtendedMindError
from extended_mind.engine.chat import ChatSession


def test_old_turns_move_to_memory_and_the_prompt_stays_within_budget(tiny_mind, tmp_path):
    session = ChatSession(tiny_mind, max_context_tokens=80, max_new_tokens=4, history=tmp_path / "h")
    for i in range(6):
        result = session.send(f"message {i}")
        assert result.prompt_tokens + 4 <= 80
    assert session.memorized_turns >= 2
    turns = session.history.documents
    assert [d.id for d in turns] == [f"turn-{i}" for i in range(session.memorized_turns)]
    assert turns[0].text.startswith("User: message 0\nAssistant: ")
    # what is still in context continues where the memory stops: nothing dropped, nothing duplicated
    in_context = [user for user, _ in session.turns]
    assert in_context == [f"message {i}" for i in range(session.memorized_turns, 6)]
    resumed = ChatSession(tiny_mind, max_context_tokens=80, max_new_tokens=4, history=tmp_path / "h")
    assert resumed.memorized_turns == session.memorized_turns


def test_chat_with_a_document_memory_cites_documents(tiny_mind):
    docs = tiny_mind.memorize("The gate opens at nine. " * 3, ids=["gate"])
    session = ChatSession(tiny_mind, memory=docs, max_new_tokens=4)
    result = session.send("When does the gate open?")
    assert result.citations and result.citations[0].doc == "gate"


def test_chat_errors(tiny_mind):
    with pytest.raises(ExtendedMindError, match="max_context_tokens"):
        ChatSession(tiny_mind, max_context_tokens=0)
    with pytest.raises(ExtendedMindError, match="chat template"):
        ChatSession(tiny_mind, chat=False)
    with pytest.raises(ExtendedMindError, match="message is empty"):
        ChatSession(tiny_mind).send("  ")

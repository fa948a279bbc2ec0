"""A save killed at any moment (SIGKILL) leaves the last good memory loadable and intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from extended_mind import Memory

# The child loads the saved memory, then saves two states in turn forever: with and without a large document of
# random keys (about 5 MB per save), so that most of its time is spent inside `save`.
CHILD = textwrap.dedent(
    """
    import sys, torch
    from extended_mind import Memory
    from extended_mind.base.documents import Document
    from extended_mind.memory.segment import Segment

    path = sys.argv[1]
    memory = Memory.load(path)
    # a run killed after saving the large document leaves it in the memory: start from the two small ones
    base = [s for s in memory.segments if s.document.id != "big"]
    h, dk, dv = memory.rope.kv_shapes[0]
    n = 20_000 // h
    big = Segment.build(
        Document("big", "x" * n), [torch.randn(h, n, dk) for _ in range(memory.num_layers)],
        [torch.randn(h, n, dv) for _ in range(memory.num_layers)], torch.zeros(n), torch.zeros(n, 2),
        memory.stride, memory.window, memory.storage,
    )
    print("saving", flush=True)
    for i in range(1000):
        memory.segments = base + [big] if i % 2 == 0 else base
        memory.save()
    """
)


def test_a_killed_save_leaves_the_previous_state_loadable(tiny_mind, tmp_path):
    path = tiny_mind.memorize(["the first document", "the second one"], ids=["a", "b"]).save(tmp_path / "m")
    good = {("a", "b"), ("a", "b", "big")}
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    for delay in (0.05, 0.3, 0.6, 0.9):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert child.stdout.readline().strip() == b"saving", child.stderr.read().decode()
        time.sleep(delay)
        assert child.poll() is None, child.stderr.read().decode()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        memory = tiny_mind.load_memory(path)
        assert tuple(d.id for d in memory.documents) in good
        memory.verify()  # every tensor file the manifest names is complete and matches its checksum
        # the next save clears whatever the killed one left behind
        memory.save()
        named = {p.name for p in (path / "tensors").iterdir()}
        assert len(named) == len(memory.documents) + 1
    assert [d.id for d in Memory.load(path).documents][:2] == ["a", "b"]

"""The harness on the trained model: a passkey beyond what the prompt holds is found from memory and missed
without it, through the same code path `extended-mind bench` uses."""

from __future__ import annotations

from extended_mind.bench.methods import Harness, parse_method
from extended_mind.bench.runner import run_task
from extended_mind.bench.tasks import TaskSpec


def test_passkey_bench_on_smollm2(smol, tmp_path):
    # repeated filler: every question draws the key's block, so the relevance test is off (docs/api.md)
    methods = [parse_method(m) for m in ("emt[block_relevance=0]", "none")]
    summary = run_task(Harness(smol), "passkey", methods, TaskSpec(lengths=[3000], depths=[0.3]), tmp_path,
                       progress=False)  # fmt: skip
    by = {r["method"]: r for r in summary["records"]}
    emt = by["emt[block_relevance=0.0]"]
    assert emt["score"] == 1.0, emt["prediction"]
    assert emt["top_citation"].startswith("The pass key is")
    assert by["none"]["score"] == 0.0
    assert "| emt[block_relevance=0.0] | 100 (1) |" in (tmp_path / "table.md").read_text()

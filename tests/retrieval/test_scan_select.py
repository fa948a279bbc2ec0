"""The exact-search scan is chosen per machine by measuring: a path that measures slower than the plain float32
scan is never chosen, the choice is cached per machine, and an override is honoured (or refused with a warning)."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from extended_mind.retrieval import scan_select
from extended_mind.retrieval.scan import KeyScan

# Measured on an AVX2-only AMD EPYC (no VNNI), 1 thread: the int8 and bfloat16 scans lose to float32 there.
AVX2_EPYC_MS = {"int8": 52.9, "bfloat16": 29.1, "float32": 3.3}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache and no remembered choice."""
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path))
    monkeypatch.delenv(scan_select.SCAN_ENV, raising=False)
    scan_select.scan_path.cache_clear()
    yield tmp_path
    scan_select.scan_path.cache_clear()


def test_the_choice_is_never_slower_than_the_plain_scan():
    rng = random.Random(0)
    for _ in range(200):
        timings = {p: rng.uniform(0.1, 50) for p in rng.sample(scan_select.SCAN_PATHS[:3], rng.randint(0, 3))}
        timings["float32"] = rng.uniform(0.1, 50)
        choice = scan_select.choose(timings)
        assert timings[choice] <= timings["float32"] and timings[choice] == min(timings.values())
    assert scan_select.choose(AVX2_EPYC_MS) == "float32"
    with pytest.raises(ValueError, match="plain float32"):
        scan_select.choose({"int8": 1.0})


def test_a_machine_where_int8_is_slow_scans_float32_keys(fresh, monkeypatch, caplog):
    monkeypatch.setattr(scan_select, "available_paths", lambda: ["int8", "bfloat16", "float32"])
    monkeypatch.setattr(scan_select, "measure", lambda paths: {p: AVX2_EPYC_MS[p] for p in paths})
    with caplog.at_level(logging.DEBUG, logger="extended_mind.retrieval.scan_select"):
        assert scan_select.scan_path() == "float32"
    assert "scan path float32" in caplog.text and "52.9" in caplog.text  # the figures behind the choice
    assert scan_select.build_scan(torch.randn(2, 100, 16)) is None  # exact search reads the keys themselves

    # cached per machine: the next process reads the figures back instead of measuring again
    scan_select.scan_path.cache_clear()
    monkeypatch.setattr(scan_select, "measure", lambda paths: pytest.fail("measured again"))
    report = scan_select.scan_report()
    assert report["cached"] and report["choice"] == "float32" and report["ms"]["int8"] == 52.9
    assert list(fresh.rglob("scan-choice.json"))


def test_the_override_is_honoured_or_refused_with_a_warning(fresh, monkeypatch, caplog):
    monkeypatch.setattr(scan_select, "available_paths", lambda: ["int8", "bfloat16", "float32"])
    monkeypatch.setattr(scan_select, "measure", lambda paths: {p: AVX2_EPYC_MS[p] for p in paths})
    monkeypatch.setenv(scan_select.SCAN_ENV, "bfloat16")
    assert scan_select.scan_path() == "bfloat16"
    assert scan_select.build_scan(torch.randn(2, 100, 16)).kind == "bfloat16"
    scan_select.scan_path.cache_clear()
    monkeypatch.setenv(scan_select.SCAN_ENV, "int8-vnni")  # not available on this (pretended) machine
    with caplog.at_level(logging.WARNING, logger="extended_mind.retrieval.scan_select"):
        assert scan_select.scan_path() == "float32"
    assert "cannot run here" in caplog.text


def test_every_path_this_machine_offers_is_measured_and_the_fastest_chosen(fresh):
    report = scan_select.scan_report()
    assert set(report["ms"]) == set(scan_select.available_paths()) and "float32" in report["ms"]
    assert report["ms"][report["choice"]] == min(report["ms"].values())
    assert report["machine"]["model"]


def test_each_call_uses_the_kernel_measured_faster_for_its_rows(fresh, monkeypatch):
    """The compiled kernels read the same packed keys: a decode step's few query rows and a prompt's many each go to
    the one measured faster for them; the figures are cached; an override pins the scan's own kernel."""
    paths = ["int8-vnni", "int8-avx2", "int8", "bfloat16", "float32"]
    monkeypatch.setattr(scan_select, "available_paths", lambda: paths)

    def fake(measured, probe=scan_select.PROBE):
        if probe is scan_select.PROBE:
            return {p: {"int8-avx2": 0.3, "int8-vnni": 0.4}.get(p, 1.0) for p in measured}
        assert measured == ["int8-vnni", "int8-avx2"]  # the packed kinds only
        many = probe is scan_select.KERNEL_PROBES["many"]
        return {"int8-vnni": 1.0 if many else 0.6, "int8-avx2": 3.0 if many else 0.8}

    monkeypatch.setattr(scan_select, "measure", fake)
    scan_select.packed_kernel.cache_clear()
    try:
        report = scan_select.scan_report()
        assert report["choice"] == "int8-avx2"
        assert report["kernels"]["few"] == "int8-vnni" and report["kernels"]["many"] == "int8-vnni"
        assert report["kernels"]["ms"]["many"] == {"int8-vnni": 1.0, "int8-avx2": 3.0}
        monkeypatch.setattr(scan_select, "measure", lambda *a: pytest.fail("measured again"))
        assert scan_select.scan_report()["cached"]
        assert scan_select.packed_kernel(True) == "int8-vnni"
        from extended_mind.retrieval.native import scan_kernel, scan_kernel_avx2

        if scan_kernel() is not None and scan_kernel_avx2() is not None:  # this machine has both kernels
            keys = torch.randn(2, 300, 64)
            key_scan = scan_select.with_measured_kernels(KeyScan.of_kind(keys, "int8-avx2"))
            assert key_scan.kernel(64) is scan_kernel() and key_scan.kernel(1) is scan_kernel()
            q = torch.randn(1, 2, 64, 64)
            ref = KeyScan.of_kind(keys, "int8-avx2")  # its own kernel
            assert torch.equal(key_scan.shortlist(q, 28).sort(-1).values, ref.shortlist(q, 28).sort(-1).values)
        scan_select.packed_kernel.cache_clear()
        monkeypatch.setenv(scan_select.SCAN_ENV, "int8-avx2")
        assert scan_select.packed_kernel(True) is None  # pinned: the scan's own kernel
    finally:
        scan_select.packed_kernel.cache_clear()

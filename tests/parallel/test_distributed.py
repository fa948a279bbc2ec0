"""A memory sharded over 2 gloo processes on localhost gives the unsharded answers, logits and citations.

Each test starts the ranks as separate processes (distributed_launch.py) running sharded_worker.py, and
compares with the same scenario run here in one process."""

from __future__ import annotations

import json

import pytest
import torch

from extended_mind.memory.store import MANIFEST, TENSOR_DIR
from tests.parallel.distributed_launch import launch
from tests.parallel.sharded_worker import CONFIGS, DOCS, TIES, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ranks_ok(results: list[dict]) -> list[dict]:
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank} failed: {r.get('error') or r.get('exit')}\n{r['log']}"
    return [r["result"] for r in results]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    sharded = _ranks_ok(launch(2, "tiny", out, out / "memory"))
    torch.set_num_threads(1)
    reference = run("tiny", False, out / "reference")
    return sharded, reference, out


def test_sharded_generation_equals_one_process(tiny_runs):
    sharded, reference, _ = tiny_runs
    for rank, got in enumerate(sharded):
        for name in CONFIGS:
            if name in TIES:  # exact ties in layer 0: the same tokens and logits, any of the tied citations
                assert [r["tokens"] for r in got[name]] == [r["tokens"] for r in reference[name]], (rank, name)
            else:
                assert got[name] == reference[name], (rank, name)
            assert torch.equal(torch.tensor(got[name + "-logits"]), torch.tensor(reference[name + "-logits"])), name
        assert got["batch"] == reference["batch"], rank


def test_sharded_edits_and_save_match(tiny_runs):
    sharded, reference, out = tiny_runs
    for got in sharded:
        assert got["edited-tokens"] == reference["edited-tokens"]
        assert got["edited-blocks"] == reference["edited-blocks"]
        assert got["reopened-tokens"] == reference["reopened-tokens"]
    # the sharded save wrote the unsharded format, byte for byte
    a = json.loads((out / "memory" / MANIFEST).read_text())
    b = json.loads((out / "reference" / MANIFEST).read_text())
    assert [(d["id"], d["sha256"]) for d in a["documents"]] == [(d["id"], d["sha256"]) for d in b["documents"]]


def test_each_rank_holds_only_its_part(tiny_runs):
    sharded, reference, _ = tiny_runs
    layout = sharded[0]["info"]["shards"]
    assert layout == sharded[1]["info"]["shards"]
    assert [s["rank"] for s in layout] == [0, 1]
    assert sum(s["documents"] for s in layout) == len(DOCS)
    assert sum(s["tokens"] for s in layout) == reference["info"]["tokens"]
    assert all(s["documents"] > 0 for s in layout)
    for rank, got in enumerate(sharded):  # keys and values held here: this rank's tokens only
        per_token = reference["info"]["bytes"] / reference["info"]["tokens"]
        assert got["info"]["bytes"] == pytest.approx(layout[rank]["tokens"] * per_token)
    assert sharded[0]["edited-info"]["shards"] == sharded[1]["edited-info"]["shards"]
    assert sum(s["tokens"] for s in sharded[0]["edited-info"]["shards"]) == reference["edited-info"]["tokens"]


@pytest.fixture(scope="module")
def saved_tiny(tiny_runs):
    return tiny_runs[2] / "reference"


def test_dead_rank_is_reported_not_hung(saved_tiny, tmp_path):
    results = launch(2, "fault", tmp_path, saved_tiny, timeout=240, collective_timeout=60)
    assert results[0]["ok"] is False
    assert "ShardError" in results[0]["error"] and "rank" in results[0]["error"], results[0]
    assert results[1].get("exit") == 3


def test_corrupt_shard_is_reported_by_rank_0(saved_tiny, tmp_path):
    import shutil

    copy = tmp_path / "memory"
    shutil.copytree(saved_tiny, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    last = manifest["documents"][-1]  # held by rank 1 (documents go to the least loaded rank, in order)
    target = copy / last["file"]
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # same size, wrong checksum
    target.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in (copy / TENSOR_DIR).iterdir()}
    results = launch(2, "open", tmp_path, copy, timeout=240)
    assert results[0]["ok"] is False and results[1]["ok"] is False
    assert "rank 1" in results[0]["error"] and "checksum" in results[0]["error"], results[0]["error"]
    assert {p.name: p.read_bytes() for p in (copy / TENSOR_DIR).iterdir()} == before  # nothing changed on disk


def _smol_memory_dir(tmp_path):
    """Three documents of real text, saved: the bundled article in two halves, and a short note."""
    from importlib.resources import files

    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()
    docs = tmp_path / "docs"
    docs.mkdir()
    half = len(article) // 2
    (docs / "aardwolf1.txt").write_text(article[:half])
    (docs / "aardwolf2.txt").write_text(article[half:])
    (docs / "note.txt").write_text("The museum in Lisbon bought a painting of an aardwolf for 80,000 escudos in 1962.")
    return docs


def test_smollm2_sharded_equals_one_process(smol, tmp_path):
    docs = _smol_memory_dir(tmp_path)
    memory = smol.memorize(sorted(docs.iterdir()), storage="bfloat16")  # slots are gathered in bfloat16
    memory.save(tmp_path / "memory")
    out = tmp_path / "out"
    out.mkdir()
    sharded = _ranks_ok(launch(2, "smol", out, tmp_path / "memory"))
    torch.set_num_threads(1)
    reference = run("smol", False, tmp_path / "memory")
    for got in sharded:
        assert got["blocks"] == reference["blocks"]
        assert got["tokens"] == reference["tokens"]
        assert [s["documents"] for s in got["info"]["shards"]] == [1, 2]


def test_cli_ask_under_torchrun_prints_the_single_process_answer(smol, tmp_path):
    import os
    import subprocess
    import sys

    from tests.parallel.distributed_launch import free_port

    docs = _smol_memory_dir(tmp_path)
    memory = smol.memorize(sorted(docs.iterdir()))
    memory.save(tmp_path / "memory")
    # a question about the whole memory's topic: no single block stands out, so the relevance test would read none;
    # block_relevance 0 reads the best blocks, and the sharded calibration and choice must equal one process's
    ask = ["-m", "extended_mind", "ask", "--memory", str(tmp_path / "memory"), "What is an aardwolf?", "--json",
           "--max-new-tokens", "16", "--block-relevance", "0"]  # fmt: skip
    # (the default reads the chosen blocks' text after the question: every rank runs that pass alike)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *ask], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), *ask]  # fmt: skip
    sharded = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = json.loads(single.stdout), json.loads(sharded.stdout)
    assert [s["rank"] for s in b.pop("shards")] == [0, 1]
    assert a == b and a["text"] and a["citations"]


def _serve(args: list[str], port: int, env: dict):
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(args + ["--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return proc
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
    raise AssertionError("server did not become healthy")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; empty where there is none)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc) -> None:
    """Kill the server and every rank under it: torchrun starts its workers in sessions of their own, so killing
    the launcher's process group alone left both ranks serving after the tests."""
    import os
    import signal

    below = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _requests(port: int) -> list:
    import concurrent.futures
    import urllib.request

    def post(body: dict):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        out = json.loads(urllib.request.urlopen(req, timeout=240).read())
        return out["choices"][0]["text"], [(c["document"], c["start"], c["end"]) for c in out.get("citations", [])]

    model = "SmolLM2-135M-Instruct"
    bodies = [{"model": model, "prompt": p, "max_tokens": 10, "memory": "aard", "block_relevance": 0}
              for p in ("The aardwolf eats", "Aardwolves live in", "The painting was bought for")]  # fmt: skip
    bodies.append({"model": model, "prompt": "Hello there,", "max_tokens": 6})  # no memory, same batch
    bodies.append({"model": model, "prompt": "The aardwolf eats", "max_tokens": 5, "memory": "aard",
                   "uncertainty_threshold": 0.5, "block_relevance": 0})  # runs alone  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: batched on the server
        return list(pool.map(post, bodies))


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_server_under_torchrun_answers_as_one_process(smol, tmp_path):
    import os
    import sys
    import time
    import urllib.request

    from tests.parallel.distributed_launch import free_port

    docs = _smol_memory_dir(tmp_path)
    smol.memorize(sorted(docs.iterdir())).save(tmp_path / "memories" / "aard")
    serve = ["-m", "extended_mind", "serve", "--memory-dir", str(tmp_path / "memories")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    port = free_port()
    proc = _serve([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(free_port()), *serve], port, env)  # fmt: skip
    ranks: list[int] = []
    try:
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/memories/aard").read())
        assert [s["documents"] for s in info["shards"]] == [1, 2]
        delete = urllib.request.Request(f"http://127.0.0.1:{port}/v1/memories/aard", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(delete)
        assert refused.value.code == 409
        sharded = _requests(port)
        ranks[:] = _descendants(proc.pid)
        assert ranks
        os.kill(proc.pid, 9)  # the launcher alone dies (SIGKILL): its ranks must not serve on as orphans
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in ranks if _alive(pid)], "ranks outlived their launcher"
    finally:
        _stop(proc)
        for pid in ranks:  # orphans of a failed check are not left running
            if _alive(pid):
                os.kill(pid, 9)
    port = free_port()
    proc = _serve([sys.executable, *serve], port, env)
    try:
        single = _requests(port)
    finally:
        _stop(proc)
    assert sharded == single
    assert all(text for text, _ in single) and single[0][1]


def test_documents_go_to_the_least_loaded_rank():
    from extended_mind.memory.sharded import least_loaded

    loads = [0, 0, 0]
    order = []
    for n in (500, 300, 300, 100, 900):
        r = least_loaded(loads)
        order.append(r)
        loads[r] += n
    assert order == [0, 1, 2, 1, 2] and loads == [500, 400, 1200]


def test_exchange_packing_round_trips_every_dtype():
    from extended_mind.parallel.group import pack, unpack

    parts = [torch.randn(2, 3, 4), torch.arange(6).view(2, 3), torch.randn(5).bfloat16(), torch.tensor([True, False])]
    back = unpack(pack(parts), [(p.shape, p.dtype) for p in parts])
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(parts, back))


def test_shards_true_without_a_process_group_is_refused(tiny_mind):
    from extended_mind import ExtendedMind
    from extended_mind.base.errors import ExtendedMindError

    with pytest.raises(ExtendedMindError, match="process group"):
        ExtendedMind(tiny_mind.model, tiny_mind.tokenizer, shards=True)
    with pytest.raises(ExtendedMindError, match="shards must be"):
        ExtendedMind(tiny_mind.model, tiny_mind.tokenizer, shards="yes")


def test_a_remote_document_names_the_rank_that_holds_it(tiny_mind):
    from extended_mind.base.errors import ExtendedMindError

    memory = tiny_mind.memorize(["some text to remember"], ids=["a"])
    segment = memory.segments[0]
    segment.rank, segment.remote = 1, True
    with pytest.raises(ExtendedMindError, match="held by rank 1"):
        segment.layer("keys", 0)

"""Continuous batching (engine/continuous.py): requests that join and leave a running batch at any step, prompts
prefilled in chunks within the step's token budget, get exactly the greedy tokens plain transformers gives each
prompt alone, on every supported architecture; a finished or cancelled request frees its row at once."""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from helpers import CONFIGS, PAD_ID, reference_greedy, save_tiny_checkpoint

PROMPTS = ["Hello", "The quick brown fox jumps", "a", "over the lazy dog and then some more"]
MAX_NEW = [9, 6, 9, 8]       # the second request leaves early, while the others still decode
ARRIVALS = [0, 2, 3, 5]      # the step at which each request is queued


class Tiny:
    def __init__(self, arch: str, root) -> None:
        self.dir = save_tiny_checkpoint(arch, root / arch)
        model = AutoModelForCausalLM.from_pretrained(self.dir).eval()
        tok = AutoTokenizer.from_pretrained(self.dir)
        self.ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        self.alone = [reference_greedy(model, [ids], n, PAD_ID)[0] for ids, n in zip(self.ids, MAX_NEW)]

    def engine(self, policy: str = "lru", budget="25%", rows: int = 3, tokens: int = 2048, **opts) -> Engine:
        return Engine.from_config(EngineConfig(model=str(self.dir), device="cpu", expert_budget=budget, policy=policy,
                                               max_batch_size=rows, max_num_batched_tokens=tokens, show_progress=False,
                                               policy_options=opts))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, tmp_path_factory.mktemp("ckpt"))


def staggered(engine: Engine, ids: list[list[int]], arrivals=ARRIVALS, max_new=MAX_NEW):
    """Queue request i at step arrivals[i]; admit FCFS whenever the batch has room; step until all are done.
    Returns the requests and, per step, the requests that were running (rows in use)."""
    batch = engine.continuous_batch()
    reqs = [engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(ids, max_new)]
    queue, occupancy, step = [], [], 0
    while step <= max(arrivals) or queue or not batch.done:
        queue += [r for r, a in zip(reqs, arrivals) if a == step]
        while queue and batch.has_room():
            batch.admit(queue.pop(0))
        occupancy.append({s.request.request_id for s in batch.running})
        batch.step()
        step += 1
    return reqs, occupancy


def test_joining_and_leaving_rows_keep_every_request_exact(tiny):
    """3 rows for 4 staggered requests: the fourth waits for a row that an early finisher frees, then joins
    while the others decode."""
    reqs, occupancy = staggered(tiny.engine(), tiny.ids)
    assert [r.output_ids for r in reqs] == tiny.alone
    assert max(len(o) for o in occupancy) == 3
    first_three = {r.request_id for r in reqs[:3]}
    assert any(reqs[3].request_id in o and len(o & first_three) >= 1 for o in occupancy)   # joined mid-stream


def test_chunked_prefill_equals_one_shot_prefill(tiny):
    """A 4-token step budget prefills the 36-token prompt over many steps, interleaved with the others' decode."""
    chunked, _ = staggered(tiny.engine(tokens=4), tiny.ids)
    one_shot, _ = staggered(tiny.engine(tokens=2048), tiny.ids)
    assert [r.output_ids for r in chunked] == [r.output_ids for r in one_shot] == tiny.alone


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Tiny:
    return Tiny("qwen2_moe", tmp_path_factory.mktemp("qwen"))


@pytest.mark.parametrize("policy,opts", [("finemoe", {"fresh": True}), ("moe-infinity", {}), ("lfu", {}),
                                         ("resident", {})])
def test_per_request_policies_with_rows_joining_midstream(qwen, policy, opts):
    """Policies that keep per-request state see every request start and end exactly once, whenever it joins."""
    engine = qwen.engine(policy, budget="100%" if policy == "resident" else "25%", **opts)
    reqs, _ = staggered(engine, qwen.ids)
    assert [r.output_ids for r in reqs] == qwen.alone
    p = engine.policy
    if policy == "moe-infinity":
        assert p.eams == {} and p.collection.size > 0      # each ended request added its matrix
    if policy == "finemoe":
        assert p.prompt_lens == {}


def test_cancel_frees_the_row_at_the_next_step(qwen):
    engine = qwen.engine(rows=1)
    batch = engine.continuous_batch()
    a, b = (engine.make_request(ids, SamplingParams(max_new_tokens=50, ignore_eos=True)) for ids in qwen.ids[:2])
    batch.admit(a)
    batch.step()
    batch.step()
    assert not batch.has_room()
    a.cancel()
    batch.step()                      # retires a (no output for it) and has nothing else to run
    assert batch.has_room() and batch.done
    batch.admit(b)
    while not batch.done:
        batch.step()
    assert a.finish_reason == "cancelled" and len(a.output_ids) == 2
    assert b.output_ids[:6] == qwen.alone[1]


def test_run_continuous_equals_next_batch_generate(qwen):
    engine = qwen.engine(rows=2, tokens=8)
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    cont = engine.run_continuous([engine.make_request(ids, params) for ids in qwen.ids])
    nxt = engine.run([engine.make_request(ids, params) for ids in qwen.ids])
    assert [r.output_ids for r in cont] == [r.output_ids for r in nxt]
    assert all(r.metrics.hits + r.metrics.misses > 0 for r in cont)


def test_token_budget_below_the_batch_size_is_refused_and_the_default_follows_the_batch_size():
    with pytest.raises(Exception, match="max-num-batched-tokens 2 is below --max-batch-size 4"):
        EngineConfig(device="cpu", max_batch_size=4, max_num_batched_tokens=2)
    assert EngineConfig(device="cpu", max_batch_size=4).step_tokens == 2048
    assert EngineConfig(device="cpu", max_batch_size=4096).step_tokens == 4096     # generate's batches need no flag


def test_a_mixed_step_tells_policies_each_rows_real_tokens(qwen):
    """A step where one request decodes while another prefills a chunk: IterationInfo.tokens and the token rows
    name exactly each row's real tokens (right-aligned); every other cell is a dead row."""
    engine = qwen.engine(rows=2, tokens=5)
    seen = []
    engine.iteration_hooks.append(lambda it, token_rows: seen.append((it, token_rows.copy())))
    batch = engine.continuous_batch()
    a, b = (engine.make_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True)) for ids in qwen.ids[:2])
    batch.admit(a)
    batch.step()                                  # a's 5-token prompt in one chunk, its first token
    batch.admit(b)
    batch.step()                                  # a decodes (1 token), b prefills 4 of its 25 prompt tokens
    it, token_rows = seen[-1]
    assert it.is_prefill and it.request_ids == [a.request_id, b.request_id] and it.tokens == [1, 4]
    assert it.input_ids.shape == (2, 4) and it.input_ids[1].tolist() == qwen.ids[1][:4]
    rows = token_rows.reshape(2, 4)
    assert rows[0].tolist() == [-2, -2, -2, 0] and rows[1].tolist() == [1, 1, 1, 1]


def test_a_finished_request_frees_its_row_before_the_next_step(qwen):
    """One row: as soon as its request has produced its last token the row is free (has_room, done), without a
    further step; a server loop that steps only while requests run must never wait on a finished one."""
    engine = qwen.engine(rows=1)
    batch = engine.continuous_batch()
    first = engine.make_request(qwen.ids[0], SamplingParams(max_new_tokens=3, ignore_eos=True))
    batch.admit(first)
    assert not batch.has_room()
    while not first.finished:
        batch.step()
    assert batch.has_room() and batch.done
    second = engine.make_request(qwen.ids[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    batch.admit(second)
    while not second.finished:
        batch.step()
    assert first.output_ids == qwen.alone[0][:3] and second.output_ids == qwen.alone[1][:3]

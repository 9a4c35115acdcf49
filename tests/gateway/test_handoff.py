"""The gateway's prefill/decode hand-off (gateway/handoff.py) over schedulers driving verifying
simulated workers joined by a simulated KV link (tests/support/handoff_steps.py).

The decode worker verifies that every slot a sequence reads holds the right token, so a transfer
that lands in the wrong blocks, skips the wrong prefix hits or lets a reused block be overwritten
fails the test. The block accounting of both schedulers and the coordinator's own audit (every
live transfer holds its blocks on both sides) are checked after every step."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.gateway.request import SequenceStatus
from paged.shared.protocol import SeqError, StepInput, StepOutput
from support.handoff_steps import PAGE_BYTES, Cluster, sim_token
from support.scheduler_steps import BS, EOS, ORDERS, finishes, host_store, req, run, texts


def prompt(length: int, start: int = 3) -> list[int]:
    return [start + i % 90 for i in range(length)]


def computed(cluster: Cluster) -> list[int]:
    """Tokens each worker computed (prompt chunks and decodes)."""
    return [node.loop.worker.num_tokens_computed for node in cluster.nodes]


def until_in_flight(cluster: Cluster, count: int = 1) -> None:
    for _ in range(200):
        if cluster.handoff.num_in_flight >= count:
            return
        cluster.step_all()
    raise AssertionError("no transfer started")


@ORDERS
def test_prompts_prefill_on_one_worker_and_decode_on_the_other(overlapped: bool) -> None:
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    lengths = [5, 8, 16, 17, 31, 40]  # partial and block-aligned prompts
    for i, length in enumerate(lengths):
        cluster.add(req(f"r{i}", prompt(length, 3 + i), max_tokens=12, ignore_eos=True))
    cluster.run()
    outputs = texts(cluster.outputs)
    for i in range(len(lengths)):
        assert len(outputs[f"r{i}"][0]) == 12 and cluster.handed_over[f"r{i}"] == "1"
    # The prefill worker computed the prompts only; the decode worker every token after the first.
    assert computed(cluster) == [sum(lengths), len(lengths) * 11]
    stats = cluster.handoff.stats
    assert (stats.started, stats.completed, stats.failures, stats.cancelled) == (6, 6, {}, 0)
    assert stats.blocks == sum(-(-length // BS) for length in lengths)
    assert stats.bytes == stats.blocks * PAGE_BYTES and stats.latency.count == sum(stats.latency.counts) == 6
    assert cluster.all_free() and cluster.link.num_pending == 0


@ORDERS
def test_outputs_are_the_same_with_and_without_disaggregation(overlapped: bool) -> None:
    def run(roles: list[str]) -> dict[str, dict[int, list[int]]]:
        cluster = Cluster(roles, overlapped=overlapped)  # type: ignore[arg-type]
        names: dict[int, int] = {}  # seq id -> a name that is the same in every run
        cluster.choose_token = lambda seq_id, position: 1 + (names[seq_id] * 7 + position) % 50
        for i in range(6):
            request = req(f"r{i}", prompt(7 + 5 * i, 10 + i), max_tokens=9, n=1 + i % 3, seed=i, ignore_eos=True)
            names.update((seq.seq_id, 10 * i + seq.index) for seq in request.seqs)
            cluster.add(request)
        cluster.run()
        return {rid: dict(seqs) for rid, seqs in texts(cluster.outputs).items()}

    # Token ids depend only on (sequence, position), so equal outputs show that every sequence
    # continued at the right position with the right state.
    mixed = run(["mixed"])
    assert run(["prefill", "decode"]) == mixed
    assert run(["prefill", "decode", "decode"]) == mixed


def test_decode_side_prefix_hits_are_not_sent() -> None:
    cluster = Cluster(["prefill", "decode"])
    shared = prompt(3 * BS)
    cluster.add(req("first", shared + [91, 92], max_tokens=6, ignore_eos=True))
    cluster.run()
    assert cluster.handoff.stats.blocks == 4 and cluster.handoff.stats.blocks_skipped == 0
    cluster.add(req("second", shared + [93, 94, 95], max_tokens=6, ignore_eos=True))
    cluster.run()
    # The decode worker cached the three shared blocks when it adopted the first request.
    assert cluster.handoff.stats.blocks == 4 + 1 and cluster.handoff.stats.blocks_skipped == 3
    assert len(texts(cluster.outputs)["second"][0]) == 6 and cluster.all_free()


def test_the_last_block_always_travels_even_when_the_decode_side_has_the_whole_prompt() -> None:
    cluster = Cluster(["prefill", "decode"])
    aligned = prompt(2 * BS)
    for name in ("a", "b"):
        cluster.add(req(name, aligned, max_tokens=5, ignore_eos=True))
        cluster.run()
    assert cluster.handoff.stats.blocks == 2 + 1 and cluster.handoff.stats.blocks_skipped == 1
    assert cluster.all_free()


@ORDERS
def test_n_greater_than_one_moves_one_table_shared_by_every_sequence(overlapped: bool) -> None:
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    cluster.add(req("fan", prompt(10), max_tokens=8, n=3, ignore_eos=True))
    cluster.run()
    outputs = texts(cluster.outputs)["fan"]
    assert sorted(outputs) == [0, 1, 2] and all(len(tokens) == 8 for tokens in outputs.values())
    assert cluster.handoff.stats.completed == 1 and cluster.handoff.stats.blocks == 3
    assert computed(cluster) == [10, 3 * 7]


def test_a_request_with_one_token_to_generate_is_not_handed_off() -> None:
    cluster = Cluster(["prefill", "decode"])
    cluster.add(req("one", prompt(9), max_tokens=1))
    cluster.run()
    assert cluster.handoff.stats.started == 0 and len(texts(cluster.outputs)["one"][0]) == 1


@ORDERS
def test_a_first_token_that_ends_the_request_cancels_its_transfer(overlapped: bool) -> None:
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    cluster.choose_token = lambda seq_id, position: EOS if position == 9 else sim_token(seq_id, position)
    cluster.link.hold = True  # the transfer is still going when the first token arrives
    cluster.add(req("short", prompt(9), max_tokens=20))
    cluster.run()
    assert finishes(cluster.outputs) == {("short", 0): "stop"}
    stats = cluster.handoff.stats
    assert (stats.started, stats.completed, stats.cancelled) == (1, 0, 1)
    assert cluster.all_free() and cluster.link.num_pending == 0


@ORDERS
def test_an_abort_mid_transfer_frees_both_sides(overlapped: bool) -> None:
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    cluster.link.hold = True
    cluster.add(req("gone", prompt(20), max_tokens=20, ignore_eos=True))
    cluster.add(req("stays", prompt(12, 50), max_tokens=6, ignore_eos=True))
    until_in_flight(cluster, 2)
    assert cluster.nodes[1].scheduler.stats().used_blocks > 0  # type: ignore[union-attr]  # held for the transfers
    cluster.abort("gone")
    cluster.link.release_held()
    cluster.run()
    assert "gone" not in cluster.handed_over and len(texts(cluster.outputs)["stays"][0]) == 6
    assert cluster.handoff.stats.cancelled == 1 and cluster.all_free()


@ORDERS
def test_a_failed_transfer_leaves_the_request_decoding_on_the_prefill_worker(overlapped: bool) -> None:
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    cluster.link.fail_next = 1
    cluster.add(req("unlucky", prompt(21), max_tokens=10, ignore_eos=True))
    cluster.run()
    assert len(texts(cluster.outputs)["unlucky"][0]) == 10
    assert cluster.handoff.stats.failures == {"failed": 1} and cluster.handoff.stats.started == 1
    assert computed(cluster) == [21 + 9, 0]  # no recompute: the prefill worker kept its KV
    assert cluster.all_free()


def mid_transfer(overlapped: bool, prompt_len: int = 25) -> Cluster:
    """A 1p1d cluster whose one request "r" (10 tokens to generate) is stuck in its KV transfer."""
    cluster = Cluster(["prefill", "decode"], overlapped=overlapped)
    cluster.link.hold = True
    cluster.add(req("r", prompt(prompt_len), max_tokens=10, ignore_eos=True))
    until_in_flight(cluster)
    return cluster


def test_a_receive_that_timed_out_before_the_send_started_is_ordered_again() -> None:
    """The decode worker gave up waiting for the sender while the prefill worker's steps queued:
    the receive is ordered once more with the first token, and the hand-off completes."""
    cluster = Cluster(["prefill", "decode"], overlapped=True)
    cluster.link.hold = True
    cluster.add(req("r", prompt(25), max_tokens=10, ignore_eos=True))
    prefill, decode = cluster.nodes
    receives: list[int] = []
    execute = decode.loop.execute

    def recording(step: StepInput) -> StepOutput:
        receives.extend(item.transfer_id for item in step.kv_receives)
        return execute(step)

    decode.loop.execute = recording
    prefill.loop.step()  # the last chunk and the KVSend; its output (the first token) stays in flight
    decode.loop.step()  # registers the receive
    cluster.link.expire_receives()
    decode.loop.drain()
    decode.loop.step()  # a polling step brings the report: failed, but the send has not started
    decode.loop.drain()
    assert cluster.handoff.num_in_flight == 1 and cluster.handoff.stats.failures == {} and len(receives) == 1
    cluster.link.release_held()
    cluster.run()
    assert len(receives) == 2 and receives[0] == receives[1]  # ordered again with the first token
    assert cluster.handed_over == {"r": "1"} and len(texts(cluster.outputs)["r"][0]) == 10
    assert cluster.handoff.stats.completed == 1 and cluster.handoff.stats.failures == {} and cluster.all_free()


@ORDERS
def test_losing_the_decode_worker_mid_transfer_keeps_the_request_on_the_prefill_worker(overlapped: bool) -> None:
    cluster = mid_transfer(overlapped)
    cluster.lose(cluster.nodes[1])
    cluster.link.release_held()  # the dead worker's side never completes
    cluster.run()
    assert len(texts(cluster.outputs)["r"][0]) == 10 and "r" not in cluster.handed_over
    assert cluster.handoff.stats.failures == {"decode_lost": 1} and cluster.all_free()


@ORDERS
def test_losing_the_prefill_worker_mid_transfer_recomputes_the_request_elsewhere(overlapped: bool) -> None:
    cluster = mid_transfer(overlapped)
    cluster.lose(cluster.nodes[0])
    assert cluster.placement["r"].name == "1"  # the only ready worker: decode workers can prefill
    cluster.link.release_held()
    cluster.run()
    tokens = texts(cluster.outputs)["r"][0]
    assert len(tokens) >= 10  # a first token delivered before the loss comes again after the recompute
    assert cluster.handoff.stats.failures == {"prefill_lost": 1} and cluster.all_free()


def test_no_decode_worker_with_room_keeps_the_request_where_it_is() -> None:
    cluster = Cluster(["prefill", "decode"], num_blocks=64)
    decode = cluster.nodes[1].scheduler
    assert decode is not None
    decode.groups.transfer_seats = decode.config.max_num_seqs  # no seat left on the decode worker
    cluster.add(req("r", prompt(10), max_tokens=5, ignore_eos=True))
    cluster.run()
    assert cluster.handoff.stats.started == 0 and len(texts(cluster.outputs)["r"][0]) == 5
    decode.groups.transfer_seats = 0


def test_transferring_sequences_are_not_scheduled_on_the_prefill_worker() -> None:
    cluster = mid_transfer(overlapped=True, prompt_len=12)
    prefill = cluster.nodes[0].scheduler
    assert prefill is not None
    (seq,) = prefill.requests["r"].live_seqs()
    assert seq.status is SequenceStatus.TRANSFERRING and not prefill.running
    before = computed(cluster)[0]
    for _ in range(5):
        cluster.step_all()
    assert computed(cluster)[0] == before  # polling steps only, nothing decoded here
    cluster.link.release_held()
    cluster.run()
    assert cluster.handed_over == {"r": "1"} and cluster.all_free()


def test_a_hold_takes_no_prefix_hit_whose_store_load_is_still_in_flight() -> None:
    """The decode worker's step loading a prompt's prefix from the host KV store is out when a
    hand-off of another request with that prefix is planned; then the load fails. Had the hold taken
    the loaded blocks as prefix hits (not sent), the request would decode on the decode worker from
    pages that never arrived: its verifying worker would read the wrong tokens."""
    cluster = Cluster(["prefill", "decode"], num_blocks=8, store=host_store(64))
    prefill, decode = cluster.nodes
    assert prefill.scheduler is not None and decode.scheduler is not None
    system = prompt(3 * BS, 60)
    # The decode worker computes the system prompt, then serves others until it is evicted to the store.
    for name, tokens in [("w0", system + [1, 2, 3]), ("w1", prompt(19, 20)), ("w2", prompt(19, 40))]:
        decode.scheduler.add_request(req(name, tokens, max_tokens=1, ignore_eos=True))
        run(decode.loop)
    decode.scheduler.add_request(req("loads", system + [4, 5, 6], max_tokens=4, ignore_eos=True))
    loading = decode.loop.pipeline.schedule()  # sent, not answered yet
    loaded = {copy.dst for copy in loading.store_loads}
    assert len(loaded) == 3
    cluster.add(req("handed", system + [7, 8, 9], max_tokens=6, ignore_eos=True))
    prefill.loop.step()  # its prompt's last chunk: the hand-off is planned, its blocks held on the decode worker
    assert cluster.handoff.num_in_flight == 1
    (held,) = decode.scheduler.kv.incoming.tables()  # type: ignore[attr-defined]
    assert loaded.isdisjoint(held)
    errors = [SeqError(item.seq_id, "block copy/swap failed: injected") for item in loading.scheduled]
    cluster.outputs += decode.loop.pipeline.complete(StepOutput(loading.step_id, errors=errors, page_moves_failed=True))
    cluster.run()
    assert any(output.request_id == "loads" and output.error is not None for output in cluster.outputs)
    assert len(texts(cluster.outputs)["handed"][0]) == 6 and cluster.handed_over == {"handed": "1"}
    assert cluster.handoff.stats.blocks_skipped == 0 and cluster.all_free()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    roles=st.sampled_from([["prefill", "decode"], ["prefill", "prefill", "decode"], ["prefill", "decode", "mixed"]]),
    overlapped=st.booleans(),
    num_blocks=st.integers(24, 80),
)
def test_random_traffic_with_failures_aborts_and_losses_leaks_nothing(
    data: st.DataObject, roles: list[str], overlapped: bool, num_blocks: int
) -> None:
    cluster = Cluster(roles, num_blocks, overlapped=overlapped, max_num_seqs=6)  # type: ignore[arg-type]
    draw = data.draw
    arrivals = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(1, 3)), min_size=1, max_size=12))
    expected: dict[str, int] = {}
    aborted: set[str] = set()
    for index, (length, max_tokens, n) in enumerate(arrivals):
        request_id = f"r{index}"
        cluster.add(req(request_id, prompt(length, index), max_tokens=max_tokens, n=n, ignore_eos=True))
        expected[request_id] = max_tokens
        for _ in range(draw(st.integers(0, 4))):
            event = draw(st.sampled_from(["step", "step", "step", "fail", "hold", "release", "expire", "abort", "lose"]))
            if event == "step":
                cluster.step_all()
            elif event == "fail":
                cluster.link.fail_next += 1
            elif event == "hold":
                cluster.link.hold = True
            elif event == "release":
                cluster.link.release_held()
            elif event == "expire":
                cluster.link.expire_receives()
            elif event == "abort":
                victim = draw(st.sampled_from(sorted(expected)))
                if victim not in aborted and cluster.placement[victim].scheduler.requests.get(victim) is not None:  # type: ignore[union-attr]
                    cluster.abort(victim)
                    aborted.add(victim)
            else:
                cluster.lose(draw(st.sampled_from(cluster.nodes)))
    cluster.link.release_held()
    cluster.run()
    outputs = texts(cluster.outputs)
    done = finishes(cluster.outputs)
    for request_id, max_tokens in expected.items():
        if request_id in aborted:
            continue
        for index, tokens in outputs[request_id].items():
            # A worker lost after streaming some tokens recomputes them: they come again.
            assert len(tokens) >= max_tokens and done[(request_id, index)] == "length"
    assert cluster.handoff.num_in_flight == 0 and cluster.all_free() and cluster.link.num_pending == 0


@pytest.mark.parametrize("roles", [["mixed", "mixed"], ["decode", "decode"]])
def test_without_a_prefill_worker_nothing_is_handed_off(roles: list[str]) -> None:
    cluster = Cluster(roles)  # type: ignore[arg-type]
    for i in range(4):
        cluster.add(req(f"r{i}", prompt(9 + i), max_tokens=6, ignore_eos=True))
    cluster.run()
    assert cluster.handoff.stats.started == 0 and all(len(t[0]) == 6 for t in texts(cluster.outputs).values())

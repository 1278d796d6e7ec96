"""vitad.streams: batches side by side on shares of torch's threads, results in order."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vitad.streams import map_in_streams


def _team(item: int) -> tuple[int, int, int]:
    """(item, thread, torch threads), the early items slowest so that they finish last."""
    time.sleep(0.02 * (4 - item) if item < 4 else 0)
    return item, threading.get_ident(), torch.get_num_threads()


def test_results_come_in_item_order_from_streams_on_their_share_of_the_threads(two_torch_threads):
    results = list(map_in_streams(_team, range(8), 2))
    assert [item for item, _, _ in results] == list(range(8))
    assert len({thread for _, thread, _ in results}) == 2 and threading.get_ident() not in {t for _, t, _ in results}
    assert {threads for _, _, threads in results} == {1}
    assert two_torch_threads() == (2, 2)


def _teams_on(torch_threads: int, items: int, streams: int) -> list[tuple[int, int, int]]:
    """:func:`_team` of each item, run with torch on ``torch_threads`` threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return list(map_in_streams(_team, range(items), streams))
    finally:
        torch.set_num_threads(threads)


def test_shares_split_all_the_threads_the_first_streams_rounding_up():
    teams = {thread: team for _, thread, team in _teams_on(3, 6, 2)}
    assert sorted(teams.values()) == [1, 2]


def test_items_beyond_full_rounds_run_after_them_in_the_calling_thread_on_all_threads(two_torch_threads):
    results = list(map_in_streams(_team, range(5), 2))
    assert [item for item, _, _ in results] == list(range(5))
    assert {threads for _, _, threads in results[:4]} == {1}
    assert threading.get_ident() not in {thread for _, thread, _ in results[:4]}
    assert results[4][1:] == (threading.get_ident(), 2)
    assert two_torch_threads() == (2, 2)


@pytest.mark.parametrize("streams, items", [(1, 5), (0, 5), (2, 1), (4, 1)])
def test_one_stream_or_one_item_runs_in_the_calling_thread_on_all_threads(two_torch_threads, streams, items):
    results = list(map_in_streams(_team, range(items), streams))
    assert {(thread, team) for _, thread, team in results} == {(threading.get_ident(), 2)}


def test_no_more_streams_than_torch_threads():
    assert {(thread, team) for _, thread, team in _teams_on(1, 4, 2)} == {(threading.get_ident(), 1)}


def test_an_error_reaches_the_caller_at_its_turn_and_drops_the_queued_items(two_torch_threads):
    started = []

    def failing_on_the_second(item: int) -> int:
        started.append(item)
        if item == 1:
            raise ValueError("item 1 is broken")
        time.sleep(0.05)
        return item

    results = []
    with pytest.raises(ValueError, match="item 1 is broken"):
        for result in map_in_streams(failing_on_the_second, range(20), 2):
            results.append(result)
    assert results == [0]
    assert len(started) <= 4  # two running and one queued when item 1 failed, none after
    assert two_torch_threads() == (2, 2)


def test_abandoning_the_iteration_restores_the_thread_count(two_torch_threads):
    results = map_in_streams(_team, range(8), 2)
    assert next(results)[0] == 0
    results.close()
    assert two_torch_threads() == (2, 2)

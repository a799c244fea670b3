"""One owner per rule: ``agree`` across ranks, and the TP-size rule's one message."""

from __future__ import annotations

import argparse

import pytest

from dstp.distributed import AnotherRankFailed, agree
from dstp.replicas import ReplicaLayout, tp_size_error


def test_agree_fails_every_rank_when_one_failed():
    def fails() -> None:
        raise FileNotFoundError("no config.json on this node")

    # this rank failed: its own exception, once every rank knows (the collective ran)
    seen: list[int] = []
    with pytest.raises(FileNotFoundError):
        agree(fails, lambda v: seen.append(v) or v)
    assert seen == [0]
    # another rank failed: a typed error, no message to match
    with pytest.raises(AnotherRankFailed, match="another rank failed during start-up"):
        agree(lambda: 1, lambda v: 0)
    assert agree(lambda: 7, lambda v: v) == 7


def test_tp_size_rule_has_one_message():
    from dstp.server.cli import FlagError, check_tp_size

    with pytest.raises(ValueError) as layout:
        ReplicaLayout(6, 4)
    args = argparse.Namespace(tensor_parallel_size=4, data_parallel_size=None)
    with pytest.raises(FlagError) as flag:
        check_tp_size(args, 6)
    assert str(layout.value) == str(flag.value) == tp_size_error(6, 4)
    assert "must divide" in str(flag.value) and "sizes that fit: [1, 2, 3, 6]" in str(flag.value)

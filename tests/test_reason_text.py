"""Cancel reasons are any text: every ``str`` is accepted and reads back as given.

Within the process that cancels, ``token.cancel_reason`` is the very string given. Through
shared memory (another process, or another token object on the same slot) it is exact
while its UTF-8 (lone surrogates 3 bytes each) fits in ``_cell.REASON_MAX`` bytes, and a
longer one is its longest prefix of whole code points that fits. Anything that is not a
``str`` (or ``None``) is refused with ``TypeError`` before anything changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cancelflow import CancellationRegistry, CancellationToken, PipelineExecutor, _cell
from cancelflow._token import _Cell, token_on_slot
from support import WAIT, pipe, receive, running

LIMIT = _cell.REASON_MAX

#: One of each kind of text that used to break (or might break) the shared slot.
TEXTS = {
    "lone_surrogate": os.fsdecode(b"caf\xe9"),  # 'caf\udce9'
    "high_surrogate": "x\ud800y",
    "pair_as_two_code_points": "\ud83d\ude00",
    "empty": "",
    "nul_inside": "a\x00b",
    "nul_only": "\x00\x00",
    "emoji": "stop \U0001f6d1 now \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "rtl": "\u05e2\u05e6\u05d5\u05e8 \u0627\u0644\u062a\u0648\u0642\u0641 \u200f!",
    "combining": "e\u0301 n\u0303",
    "private_use_and_max": "\ue000\U0010ffff",
}

any_text = st.text(st.characters(exclude_categories=()), max_size=200)


def shared_pair() -> tuple[CancellationToken, CancellationToken]:
    """A token another process may read, and a second token object on its slot: what a
    child process builds. The second one reads the reason from shared memory only."""
    token = CancellationToken()
    token._export()  # what handing it to a starting process does
    return token, token_on_slot(token._chunk, token._offset)


def stored_form(reason: str) -> str:
    """What shared memory gives back for ``reason`` (see the module docstring)."""
    raw = reason.encode("utf-8", "surrogatepass")
    if len(raw) <= LIMIT:
        return reason
    prefix = ""
    size = 0
    for char in reason:
        width = len(char.encode("utf-8", "surrogatepass"))
        if size + width > LIMIT:
            break
        prefix += char
        size += width
    return prefix


# -- processes --------------------------------------------------------------------------


def _child_reads(tokens: list[CancellationToken], ready: Any, conn: Any) -> None:
    ready.set()
    conn.send([(token.wait_blocking(WAIT), token.cancel_reason) for token in tokens])


def _child_cancels(tokens: list[CancellationToken], reasons: list[str], conn: Any) -> None:
    conn.send([token.cancel(reason) for token, reason in zip(tokens, reasons, strict=True)])


# -- tests ------------------------------------------------------------------------------


class TestReasonInProcess:
    @pytest.mark.parametrize("reason", TEXTS.values(), ids=TEXTS.keys())
    def test_reason_round_trips_on_a_private_token(self, reason: str) -> None:
        """Test that a token only this process sees gives back exactly the reason given."""
        token = CancellationToken()
        assert token.cancel(reason) is True
        assert token.cancel_reason == reason

    @pytest.mark.parametrize("reason", TEXTS.values(), ids=TEXTS.keys())
    def test_reason_round_trips_through_shared_memory(self, reason: str) -> None:
        """Test that a shared token is cancelled with any short text and that the slot
        gives it back exactly: to the canceller and to a reader of the slot.

        Regression: a lone surrogate raised UnicodeEncodeError in the slot write and the
        token stayed not cancelled.
        """
        token, view = shared_pair()
        assert token.cancel(reason) is True
        assert token.is_cancelled
        assert view.is_cancelled
        assert token.cancel_reason == reason
        assert view.cancel_reason == reason

    def test_nul_does_not_cut_the_shared_reason(self) -> None:
        """Test that the slot keeps the bytes after a NUL (it is read by its length)."""
        token, view = shared_pair()
        token.cancel("a\x00b\x00")
        assert view.cancel_reason == "a\x00b\x00"

    def test_reason_given_before_sharing_round_trips(self) -> None:
        """Test that a reason kept locally (cancelled while private) is written to the slot
        exactly when the token is shared afterwards."""
        reason = TEXTS["lone_surrogate"] + TEXTS["nul_inside"]
        token = CancellationToken()
        token.cancel(reason)
        token._write_shared_reason(token._reason)  # what pickling for a process start does
        view = token_on_slot(token._chunk, token._offset)
        assert view.cancel_reason == reason

    @pytest.mark.parametrize("reason", TEXTS.values(), ids=TEXTS.keys())
    def test_child_token_gets_parent_reason_exactly(self, reason: str) -> None:
        """Test that a child token is cancelled with its parent's reason, unchanged."""
        parent = CancellationToken()
        child = parent.child()
        parent.cancel(reason)
        assert child.cancel_reason == reason

    def test_linked_token_gets_reason_of_shared_source(self) -> None:
        """Test that a linked token takes any text from a shared source unchanged."""
        reason = TEXTS["lone_surrogate"]
        source, _view = shared_pair()
        linked = CancellationToken.linked(CancellationToken(), source)
        source.cancel(reason)
        assert linked.cancel_reason == reason

    def test_shared_child_of_parent_with_odd_reason_is_cancelled(self) -> None:
        """Test that propagating a lone-surrogate reason into a shared child cancels it
        (the slot write of the child used to raise inside the parent's callback)."""
        reason = TEXTS["lone_surrogate"]
        parent = CancellationToken()
        child = parent.child()
        child._export()
        view = token_on_slot(child._chunk, child._offset)
        parent.cancel(reason)
        assert child.is_cancelled
        assert view.cancel_reason == reason


class TestLongReason:
    @pytest.mark.parametrize(
        ("reason", "expected"),
        [
            ("a" * LIMIT, "a" * LIMIT),
            ("a" * LIMIT + "b", "a" * LIMIT),
            ("a" * (LIMIT - 1) + "\u00e9", "a" * (LIMIT - 1)),  # 2-byte character cut
            ("a" * (LIMIT - 2) + "\u20ac", "a" * (LIMIT - 2)),  # 3-byte character cut
            ("a" * (LIMIT - 1) + "\udce9", "a" * (LIMIT - 1)),  # lone surrogate cut
            ("a" * (LIMIT - 3) + "\U0001f6d1", "a" * (LIMIT - 3)),  # 4-byte character cut
            ("a" * (LIMIT - 4) + "\U0001f6d1", "a" * (LIMIT - 4) + "\U0001f6d1"),
            ("\u00e9" * 100, "\u00e9" * (LIMIT // 2)),
        ],
        ids=["fits", "one_over", "cut_2", "cut_3", "cut_surrogate", "cut_4", "fits_4", "many_2"],
    )
    def test_long_reason_reads_as_longest_whole_prefix(self, reason: str, expected: str) -> None:
        """Test that a reason over the slot's limit reads back from shared memory as its
        longest prefix of whole code points, never cut inside a character's bytes."""
        token, view = shared_pair()
        token.cancel(reason)
        assert view.cancel_reason == expected
        assert token.cancel_reason == reason  # the canceller keeps it whole

    def test_reading_a_slot_with_bad_bytes_does_not_raise(self) -> None:
        """Test that bytes no cancel could have written (say, UTF-8 cut by another writer)
        read as replacement characters instead of raising."""
        token, view = shared_pair()
        token.cancel("x")
        raw = b"ab\xe2\x82"
        ctypes.memmove(ctypes.addressof(token) + _Cell._reason_bytes.offset, raw, len(raw))
        token._reason_len = len(raw)
        assert view.cancel_reason == "ab\ufffd"

    def test_reading_a_slot_with_a_wild_length_stays_in_the_slot(self) -> None:
        """Test that a length field larger than the slot reads at most the slot's bytes."""
        token, view = shared_pair()
        token.cancel("a" * LIMIT)
        token._reason_len = 10_000
        assert view.cancel_reason == "a" * LIMIT


class TestReasonProperties:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(reason=any_text)
    def test_any_text_round_trips_locally(self, reason: str) -> None:
        """Test that any text is accepted and kept exactly by the canceller."""
        token = CancellationToken()
        assert token.cancel(reason) is True
        assert token.cancel_reason == reason

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(reason=any_text)
    def test_any_text_up_to_the_limit_round_trips_through_the_slot(self, reason: str) -> None:
        """Test that any text reads back from shared memory exactly when it fits, and as its
        longest fitting prefix of whole code points when it does not."""
        token, view = shared_pair()
        assert token.cancel(reason) is True
        assert view.cancel_reason == stored_form(reason)


class TestReasonAcrossProcesses:
    def test_parent_reasons_reach_child_exactly(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that a child process (fork, spawn, forkserver) reads the parent's reason
        exactly, whatever the text (one token per kind of text)."""
        reasons = list(TEXTS.values())
        tokens = [CancellationToken() for _ in reasons]
        ready = mp_context.Event()
        with pipe() as (reader, writer), running(mp_context, _child_reads, tokens, ready, writer):
            assert ready.wait(WAIT)
            won = [token.cancel(reason) for token, reason in zip(tokens, reasons, strict=True)]
            assert won == [True] * len(reasons)
            assert receive(reader) == [(True, reason) for reason in reasons]

    def test_child_reasons_reach_parent_exactly(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that the parent reads exactly the reason a child process cancelled with,
        whatever the text (one token per kind of text)."""
        reasons = list(TEXTS.values())
        tokens = [CancellationToken() for _ in reasons]
        with (
            pipe() as (reader, writer),
            running(mp_context, _child_cancels, tokens, reasons, writer) as proc,
        ):
            assert receive(reader) == [True] * len(reasons)
            proc.join(WAIT)
            assert proc.exitcode == 0
        assert [(token.is_cancelled, token.cancel_reason) for token in tokens] == [
            (True, reason) for reason in reasons
        ]

    def test_long_odd_reason_reaches_child_as_whole_prefix(self, mp_singletons: None) -> None:
        """Test that a child reads a too-long reason as its longest whole-code-point
        prefix, surrogates included, without an error on either side."""
        ctx = multiprocessing.get_context("spawn")
        reason = "\udce9" * 50  # 150 bytes stored
        token = CancellationToken()
        ready = ctx.Event()
        with pipe() as (reader, writer), running(ctx, _child_reads, [token], ready, writer):
            assert ready.wait(WAIT)
            token.cancel(reason)
            assert receive(reader) == [(True, "\udce9" * (LIMIT // 3))]
        assert token.cancel_reason == reason


BAD_REASONS = [b"bytes", 3, 1.5, ["list"], object()]


class TestReasonType:
    @pytest.mark.parametrize("bad", BAD_REASONS, ids=lambda b: type(b).__name__)
    def test_token_cancel_refuses_non_text_and_changes_nothing(self, bad: object) -> None:
        """Test that cancel() refuses a non-str reason, naming it, and the token is still
        cancellable (with a good reason) afterwards."""
        token, _view = shared_pair()
        with pytest.raises(TypeError, match="reason"):
            token.cancel(bad)  # type: ignore[arg-type]
        assert not token.is_cancelled
        assert token.cancel("good") is True
        assert token.cancel_reason == "good"

    @pytest.mark.parametrize("bad", BAD_REASONS, ids=lambda b: type(b).__name__)
    def test_registry_cancels_refuse_non_text_and_change_nothing(self, bad: object) -> None:
        """Test that every registry cancel refuses a non-str reason, naming it, for known
        and unknown pipelines alike, and cancels nothing."""
        registry = CancellationRegistry()
        token = registry.register("p")
        for pipeline_id in ("p", "unknown"):
            with pytest.raises(TypeError, match="reason"):
                registry.cancel_threadsafe(pipeline_id, bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="reason"):
                asyncio.run(registry.cancel(pipeline_id, bad))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="reason"):
            asyncio.run(registry.cancel_all(bad))  # type: ignore[arg-type]
        assert not token.is_cancelled
        assert registry.active_pipelines() == ("p",)

    def test_registry_cancel_keeps_odd_reason(self) -> None:
        """Test that the registry passes any text to the pipeline's token unchanged."""
        reason = TEXTS["lone_surrogate"] + TEXTS["nul_inside"]
        registry = CancellationRegistry()
        token = registry.register("p")
        assert registry.cancel_threadsafe("p", reason) is True
        assert token.cancel_reason == reason

    @pytest.mark.parametrize("bad", BAD_REASONS, ids=lambda b: type(b).__name__)
    def test_executor_refuses_non_text_reason_before_closing(self, bad: object) -> None:
        """Test that PipelineExecutor.interrupt() and aclose() refuse a non-str reason,
        naming it, and aclose() does not close the executor then."""

        async def main() -> None:
            executor = PipelineExecutor()
            with pytest.raises(TypeError, match="reason"):
                executor.interrupt("p", bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="reason"):
                await executor.aclose(bad)  # type: ignore[arg-type]
            assert not executor.closed
            await executor.aclose()

        asyncio.run(main())

"""The pipeline event bus: progress and cancellation events for displays, logs and metrics.

A :class:`PipelineExecutor` publishes these events on its :class:`EventBus`, in this order
for one run (``*`` marks events that may not occur)::

    pipeline_started
      node_started            one per node started; then exactly one of
      node_finished           ... the node returned
      node_failed             ... the node raised (or ran past its own timeout)
      node_cancelled          ... the node was interrupted
    * execution_cancelled     the run was cancelled or timed out
    pipeline_finished         always last for the run
    * cancellation_handled    run_pipeline() turned a cancellation into a result

Payloads (``event.data``, also readable as ``event["key"]``):

=======================  ===========================================================
``pipeline_started``     ``total_waves``, ``node_count``, ``mode``
``node_started``         ``wave_num``, ``run_in``
``node_finished``        ``wave_num``, ``run_in``
``node_failed``          ``wave_num``, ``run_in``, ``error`` (the exception)
``node_cancelled``       ``wave_num``, ``run_in``, ``reason``
``execution_cancelled``  ``wave_num``, ``total_waves``, ``partial_results_count``,
                         ``cancel_reason``
``pipeline_finished``    ``outcome`` (``"completed"``, ``"cancelled"``,
                         ``"timed_out"`` or ``"failed"``), ``wave_num``,
                         ``total_waves``, ``results_count``, ``reason``
``cancellation_handled`` ``message``, ``wave_num``, ``partial_results_count``,
                         ``cancel_reason``
=======================  ===========================================================
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._log import safe_log
from ._validate import seconds_error

__all__ = ("EVENT_NAMES", "EventBus", "PipelineEvent", "Subscriber", "Subscription")

EVENT_NAMES: tuple[str, ...] = (
    "pipeline_started",
    "node_started",
    "node_finished",
    "node_failed",
    "node_cancelled",
    "execution_cancelled",
    "pipeline_finished",
    "cancellation_handled",
)
_ALL = "*"


@dataclass(frozen=True, slots=True)
class PipelineEvent:
    """One event: its ``name``, the ``pipeline_id`` (and ``node_id``) it is about, and
    its payload ``data`` (see the module docstring for each event's keys)."""

    name: str
    pipeline_id: str
    node_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


#: A subscriber takes the event; it may be a plain function or a coroutine function.
Subscriber = Callable[[PipelineEvent], "Awaitable[object] | object"]


class Subscription:
    """What :meth:`EventBus.subscribe` returns; :meth:`remove` unsubscribes (idempotent)."""

    __slots__ = ("_bus", "callback", "event")

    def __init__(self, bus: EventBus, event: str, callback: Subscriber) -> None:
        self._bus = bus
        self.event = event
        self.callback = callback

    def remove(self) -> bool:
        """Stop delivering events to this subscriber; ``True`` if it was subscribed."""
        return self._bus._remove(self)


class EventBus:
    """Delivers pipeline events to subscribers, in subscription order.

    Invariants: a subscriber never breaks a pipeline. One that raises is logged (with
    the event's ``pipeline_id`` and ``node_id``) and the others still get the event. An
    async subscriber is awaited before the run goes on, so each subscriber sees one run's
    events in order; it is bounded by ``subscriber_timeout`` seconds, after which it is
    cancelled and logged. Sync subscribers run on the event loop thread and must be quick.

    Subscribing and unsubscribing are safe from any thread, also while an event is being
    delivered (that delivery uses the subscribers present when it started).

    Not promised: delivery to a subscriber added during a run starts with the next event
    emitted; events of concurrent runs may interleave.

    Args:
        subscriber_timeout: bound on each async subscriber call, in seconds (``None``:
            unbounded).
    """

    def __init__(self, *, subscriber_timeout: float | None = 5.0) -> None:
        if subscriber_timeout is not None:  # kept as given: an infinite bound is no bound
            error = seconds_error(
                subscriber_timeout, "subscriber_timeout", positive=True, finite=False, or_none=True
            )
            if error is not None:
                raise error
        self.subscriber_timeout = subscriber_timeout
        self._subscriptions: tuple[Subscription, ...] = ()

    def subscribe(self, event: str, callback: Subscriber) -> Subscription:
        """Call ``callback(event)`` for every event named ``event`` (``"*"``: all events).

        Raises:
            ValueError: ``event`` is not one of :data:`EVENT_NAMES` nor ``"*"``.
            TypeError: ``callback`` is not callable.
        """
        if event != _ALL and event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}; expected one of {EVENT_NAMES} or '*'")
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        subscription = Subscription(self, event, callback)
        self._subscriptions = (*self._subscriptions, subscription)
        return subscription

    def unsubscribe(self, event: str, callback: Subscriber) -> bool:
        """Remove the first subscription of ``callback`` to ``event``; ``True`` if found."""
        for subscription in self._subscriptions:
            if subscription.event == event and subscription.callback == callback:
                return self._remove(subscription)
        return False

    def _remove(self, subscription: Subscription) -> bool:
        before = self._subscriptions
        self._subscriptions = tuple(s for s in before if s is not subscription)
        return len(self._subscriptions) != len(before)

    def has_subscribers(self, event: str | None = None) -> bool:
        """Whether anyone listens to ``event`` (any event if ``None``); cheap."""
        if event is None:
            return bool(self._subscriptions)
        return any(s.event in (event, _ALL) for s in self._subscriptions)

    async def emit(self, event: PipelineEvent) -> None:
        """Deliver ``event`` to its subscribers, in order; never raises their errors."""
        for subscription in self._subscriptions:
            if subscription.event != event.name and subscription.event != _ALL:
                continue
            try:
                outcome = subscription.callback(event)
                if inspect.isawaitable(outcome):
                    if self.subscriber_timeout is None:
                        await outcome
                    else:
                        await asyncio.wait_for(outcome, self.subscriber_timeout)
            except TimeoutError as exc:
                self._report(subscription, event, exc, "timed out")
            except Exception as exc:  # noqa: BLE001 - a subscriber must not break a pipeline
                self._report(subscription, event, exc, "raised")

    @staticmethod
    def _report(
        subscription: Subscription, event: PipelineEvent, exc: BaseException, what: str
    ) -> None:
        safe_log(
            "ERROR",
            f"event subscriber {subscription.callback!r} {what} on {event.name!r}",
            exception=exc,
            pipeline_id=event.pipeline_id,
            node_id=event.node_id,
        )

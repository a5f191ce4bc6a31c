"""Ingestion: what nodes report about their tasks — events, metered API requests (priced into
the ledger), artifacts sent in chunks, and outcomes — written to the store in order and once."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import msgspec

from marathon.orchestrator.lifecycle import ACTIVE, State
from marathon.orchestrator.tasks import TaskService, event_in, task_topic
from marathon.orchestrator.uploads import SessionUploads
from marathon.pricing import cost, price_for
from marathon.protocol import messages as m
from marathon.store import artifacts
from marathon.store import EventIn, TaskRecord
from marathon.store.models import LedgerRow

log = logging.getLogger("marathon.orchestrator")
NODE_SHUTDOWN = m.NODE_SHUTDOWN


class Ingest:
    def __init__(self, tasks: TaskService):
        self.tasks = tasks
        self.store, self.bus, self.config = tasks.store, tasks.bus, tasks.config
        self._unpriced_warned: set[str] = set()

    def price(self, task_id: str, owner: str, ev: m.ApiRequestEvent) -> tuple[m.ApiRequestEvent, LedgerRow]:
        price, known = price_for(ev.model, self.tasks.prices, self.config.price_fallback)
        if not known and ev.model not in self._unpriced_warned:
            self._unpriced_warned.add(ev.model)
            log.warning("no price for model %r: metered at the fallback price %s", ev.model, self.config.price_fallback)
        usd = cost(ev.usage, price)
        u = ev.usage
        row = LedgerRow(
            task_id=task_id,
            user_id=owner,
            ts=time.time(),
            model=ev.model or "",
            **u.as_dict(),
            tool_calls=ev.tool_calls,
            cost_usd=usd,
            status=ev.status,
            duration_s=ev.duration_s,
            ttft_s=ev.ttft_s,
            request_bytes=ev.request_bytes,
            response_bytes=ev.response_bytes,
            complete=ev.complete,
            priced=known,
        )
        return msgspec.structs.replace(ev, cost_usd=usd), row

    async def record_events(self, node_id: str, msgs: list[m.TaskEvent]) -> None:
        """Persist a batch of events from one node, in order, idempotently (node_seq)."""
        batch: list[EventIn] = []
        recs: dict[str, TaskRecord | None] = {}
        for msg in msgs:
            if msg.task_id not in recs:
                recs[msg.task_id] = await self.store.get_task(msg.task_id)
            rec = recs[msg.task_id]
            if rec is None or rec.node_id != node_id or rec.attempt != msg.attempt:
                continue  # from an attempt that is no longer the task's
            ev = msg.event
            if isinstance(ev, m.StateEvent) and ev.state == State.RUNNING:
                await self._flush(batch)
                batch = []
                await self.tasks.move(
                    msg.task_id,
                    State.RUNNING,
                    expect={State.STARTING},
                    expect_node=node_id,
                    expect_attempt=msg.attempt,
                    changes={"started_at": time.time(), "last_node_seq": msg.node_seq},
                )
                continue
            if isinstance(ev, m.StateEvent):
                continue  # states are the orchestrator's to record
            if isinstance(ev, m.ApiRequestEvent):
                ev, row = self.price(msg.task_id, rec.owner, ev)
                batch.append(
                    msgspec.structs.replace(
                        event_in(msg.task_id, ev, node_seq=msg.node_seq, node_id=node_id), ledger=row
                    )
                )
                continue
            batch.append(event_in(msg.task_id, ev, node_seq=msg.node_seq, node_id=node_id))
        await self._flush(batch)

    async def _flush(self, batch: list[EventIn]) -> None:
        if not batch:
            return
        stored = await self.store.append_events(batch)
        for ev, s in zip(batch, stored, strict=True):
            if s is not None and ev.ledger is not None:  # metered once: a resent duplicate is refused above
                self.tasks.metrics.metered(ev.ledger)
        metered = {ev.task_id for ev, s in zip(batch, stored, strict=True) if s is not None and ev.ledger is not None}
        for task_id in metered:  # live usage and cost on the task, from the ledger
            usage, usd = await self.store.ledger_totals(task_id)
            await self.store.update_task(task_id, expect_state=None, changes={"usage": usage, "cost_usd": usd})
        for task_id in {s.task_id for s in stored if s is not None}:
            await self.bus.notify(task_topic(task_id))

    async def record_blob(self, node_id: str, uploads: SessionUploads, msg: m.TaskBlob) -> bool:
        """A chunk of an artifact the node uploads, written to its file as it arrives; the
        artifact is stored when its last chunk is in and checks out (then True).  Only for a
        task (and attempt) assigned to this node: anything else is refused at its first chunk."""
        if msg.name != "bundle":
            log.warning("task %s: unexpected artifact %r from node %s", msg.task_id[:40], msg.name[:40], node_id)
            return False
        if msg.offset == 0:
            rec = await self.store.get_task(msg.task_id)
            if rec is None or rec.node_id != node_id or rec.attempt != msg.attempt or State(rec.state) not in ACTIVE:
                log.warning(
                    "node %s uploads a %s for task %s attempt %d, which is not assigned to it: refused",
                    node_id,
                    msg.name,
                    msg.task_id[:40],
                    msg.attempt,
                )
                uploads.drop((msg.task_id, msg.attempt, msg.name))
                return False
            uploads.start(msg)
        path = uploads.add(msg)
        if path is None:
            return False
        try:
            rec = await self.store.get_task(msg.task_id)
            if rec is None or rec.node_id != node_id or rec.attempt != msg.attempt:
                return False
            await artifacts.put_file(self.store, msg.task_id, msg.name, path)  # part by part, never whole
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return True

    async def record_outcome(self, node_id: str, msg: m.TaskResult) -> TaskRecord | None:
        out = msg.outcome
        try:
            target = State(out.state)
        except ValueError:
            target, out = (
                State.FAILED,
                msgspec.structs.replace(out, reason="sandbox_failed", message=f"unknown outcome state {out.state!r}"),
            )
        prev = await self.store.get_task(msg.task_id)
        if prev is None or prev.node_id != node_id or prev.attempt != msg.attempt or State(prev.state) not in ACTIVE:
            log.info(
                "task %s: ignored outcome %s from node %s (attempt %d is not current)",
                msg.task_id,
                out.state,
                node_id,
                msg.attempt,
            )
            return None
        if out.reason == NODE_SHUTDOWN and target in (State.CANCELLED, State.FAILED):
            # the node stopped it because the node itself is going away: the task is not at fault,
            # so it is queued again at once (no node_grace wait) and the attempt is not counted
            usage, usd = await self.store.ledger_totals(msg.task_id)
            await self.store.update_task(msg.task_id, expect_state=None, changes={"usage": usage, "cost_usd": usd})
            return await self.tasks.requeue_or_fail(
                prev, NODE_SHUTDOWN, out.message or f"node {node_id} shut down", free=True
            )
        if out.diff:
            await self.store.put_artifact(msg.task_id, "diff", out.diff.encode())
        if out.memory is not None:
            await self.store.put_artifact(msg.task_id, "memory", out.memory.encode())
        usage, usd = await self.store.ledger_totals(msg.task_id)
        changes = {
            "usage": usage,
            "cost_usd": usd,
            "claude_usage": out.claude_usage,
            "exit_code": out.exit_code,
            "is_error": out.is_error,
            "diff_stat": out.diff_stat,
            "final_text": out.final_text[-4000:],
            "last_node_seq": msg.node_seq,
            "num_turns": prev.num_turns + out.num_turns,
            "compute_s": prev.compute_s + out.duration_s,
            "iterations": out.iterations or prev.iterations,
            "reply": None,
            "pr_url": out.pr_url,
            "pr_error": out.pr_error,
        }
        if out.head:
            changes.update(commits=out.commits, head=out.head, branch=out.branch)
        rec = await self.tasks.move(
            msg.task_id,
            target,
            reason=out.reason,
            message=out.message,
            changes=changes,
            expect=ACTIVE,
            expect_node=node_id,
            expect_attempt=msg.attempt,
        )
        if rec is None:
            log.info("task %s: ignored outcome %s from node %s (task no longer there)", msg.task_id, out.state, node_id)
        return rec

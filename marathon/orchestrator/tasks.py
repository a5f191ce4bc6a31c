"""Task operations: submit, move through the lifecycle, requeue, cancel, answer.  What nodes
report (events, usage, artifacts, outcomes) is ingested in ``ingest``.

Every state change is a compare-and-set in the store plus a persisted ``state`` event,
then a bus notification; followers read the store, so nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from marathon import repos
from marathon.bus import Bus
from marathon.config import Config
from marathon.errors import (
    Conflict,
    Forbidden,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    SecretsError,
)
from marathon.orchestrator.lifecycle import TERMINAL, State, transition
from marathon.orchestrator.metrics import OrchestratorMetrics
from marathon.orchestrator.reconcile import ActiveTask, Fail, Requeue, give_back
from marathon.pricing import merged_table
from marathon.protocol import messages as m
from marathon.protocol.blobs import chunks
from marathon.store import artifacts
from marathon.store import EventIn, Store, TaskRecord, TaskRequest
from marathon.store.models import BRANCH_PATTERN, REPO_PATTERN
from marathon.units import parse_size

log = logging.getLogger("marathon.orchestrator")
_json = msgspec.json.Encoder()

SCHED_TOPIC = "scheduler"
CANCEL_TOPIC = "cancels"  # a task ended here while a node connected to another replica may run it
MAX_PROMPT_BYTES = 1024 * 1024  # UTF-8 bytes; the prompt reaches Claude Code on stdin, never in argv


def task_topic(task_id: str) -> str:
    return f"task:{task_id}"


def event_in(task_id: str, event: m.Event, *, node_seq: int | None = None, node_id: str | None = None) -> EventIn:
    return EventIn(task_id, str(type(event).__struct_config__.tag), _json.encode(event), node_seq, node_id)


def active_task(
    rec: TaskRecord, running_since: float | None = None, scheduled_since: float | None = None
) -> ActiveTask:
    """What the deadline decisions need of a stored task."""
    return ActiveTask(
        rec.id,
        State(rec.state),
        rec.node_id,
        attempt=rec.attempt,
        free_attempts=rec.free_attempts,
        timeout=rec.request.timeout,
        running_since=running_since,
        scheduled_since=scheduled_since,
    )


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def idempotent_task_id(owner: str, key: str) -> str:
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:12]


def new_task_id() -> str:
    return secrets.token_hex(6)


_REPO = re.compile(REPO_PATTERN)  # the OpenAPI document's: a subset of what repos.classify takes as not relative
_BRANCH = re.compile(BRANCH_PATTERN)  # what the API's schema says: segments of [A-Za-z0-9_-], single dots inside


def validate_request(req: TaskRequest) -> TaskRequest:
    # the decoder checked the patterns with Python's re, whose $ also matches before a final
    # newline; the OpenAPI document's (JSON Schema) $ does not: refuse what it refuses
    for name in ("repo", "branch_name", "memory_limit", "disk_limit"):
        value = getattr(req, name)
        if isinstance(value, str) and value.endswith("\n"):
            raise InvalidRequest(f"{name} must not end with a newline")
    if not req.prompt.strip():
        raise InvalidRequest("prompt must not be empty")
    size = len(req.prompt.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        raise InvalidRequest(f"prompt is {size} bytes of UTF-8; the limit is {MAX_PROMPT_BYTES} bytes")
    if req.repo is not None and (not _REPO.match(req.repo) or repos.classify(req.repo) == "relative"):
        raise InvalidRequest(
            f"repo {req.repo!r}: give a URL, owner/name, or an absolute path (the CLI makes relative paths absolute)"
        )
    changes = {}
    for name in ("memory_limit", "disk_limit"):
        value = getattr(req, name)
        if value is not None:
            try:
                size = parse_size(value)
            except ValueError as exc:
                raise InvalidRequest(f"{name}: {exc}") from None
            if size < 16 * 1024 * 1024:
                raise InvalidRequest(f"{name} must be at least 16 MiB")
            if size > 2**53:
                raise InvalidRequest(f"{name} must be at most 2**53 bytes")
            changes[name] = size
    if req.cpu_limit is not None and not 0.01 <= req.cpu_limit <= 1024:
        raise InvalidRequest("cpu_limit must be between 0.01 and 1024 cores")
    if changes:
        req = msgspec.structs.replace(req, **changes)
    if req.max_turns is not None and not 1 <= req.max_turns <= 1000:
        raise InvalidRequest("max_turns must be between 1 and 1000")
    if req.timeout is not None and not 1 <= req.timeout <= 7 * 86400:
        raise InvalidRequest("timeout must be between 1 second and 7 days")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens must be positive")
    if req.max_cost is not None and req.max_cost <= 0:
        raise InvalidRequest("max_cost must be positive")
    if not 1 <= req.max_iterations <= 100:
        raise InvalidRequest("max_iterations must be between 1 and 100")
    if req.promise is not None and (not req.promise.strip() or "\n" in req.promise or "<" in req.promise):
        raise InvalidRequest("promise must be one line of text without '<'")
    if req.verify is not None and not req.verify.strip():
        raise InvalidRequest("verify must be a command")
    if req.verify_timeout is not None and not 1 <= req.verify_timeout <= 86400:
        raise InvalidRequest("verify_timeout must be between 1 second and a day")
    if req.branch_name is not None and not (len(req.branch_name) <= 200 and _BRANCH.match(req.branch_name)):
        raise InvalidRequest(f"bad branch name {req.branch_name!r}")
    if req.pr and not req.repo:
        raise InvalidRequest("--pr needs --repo")
    return req


class TaskService:
    def __init__(self, store: Store, bus: Bus, config: Config, *, metrics: OrchestratorMetrics | None = None):
        self.store, self.bus, self.config = store, bus, config
        self.metrics = metrics or OrchestratorMetrics()
        self.prices = merged_table(config.prices)

    # ------------------------------------------------------------------ reads

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        rec = await self.store.get_task(task_id)
        if rec is None or (owner is not None and rec.owner != owner):
            raise NotFound(f"no task {task_id!r}")
        return rec

    async def assignment(self, rec: TaskRecord) -> tuple[m.Assign, artifacts.Manifest | bytes | None]:
        """What the node gets: the spec, the owner's GitHub token (for the node only), and for a
        resumed task its notes and what its last bundle is (sent with ``bundle_chunks``)."""
        req = rec.request
        memory = await self.store.get_artifact(rec.id, "memory") if rec.iterations else None
        bundle = await artifacts.manifest(self.store, rec.id, "bundle") if rec.iterations else None
        owner = await self.store.get_user(rec.owner)
        spec = m.TaskSpec(
            task_id=rec.id,
            request=req,
            attempt=rec.attempt,
            model=req.model or self.config.model or None,
            max_turns=req.max_turns or self.config.max_turns,
            timeout_s=req.timeout or self.config.timeout,
            verify_timeout=req.verify_timeout or 600.0,
            prices=self.prices,
            price_fallback=self.config.price_fallback,
            iterations_done=rec.iterations,
            reply=rec.reply,
            memory=memory.decode(errors="replace") if memory else None,
            resume=bundle is not None,
            trusted_repo=bool(owner and owner.admin),
        )
        # the token is decrypted here only, and only for a task that needs it (a PR, a clone from GitHub)
        needed = repos.needs_github_token(req.repo, req.pr, self.config.github_url)
        try:
            token = await self.store.github_token(rec.owner) if owner and owner.github_token and needed else None
        except SecretsError as exc:  # the operator must fix the keys; the task runs without the token
            log.error("task %s: %s", rec.id, exc, extra={"task_id": rec.id})
            token = None
        return m.Assign(task=spec, github_token=token), bundle

    async def bundle_chunks(self, task_id: str, found: artifacts.Manifest | bytes) -> AsyncIterator[m.AssignBlob]:
        """A resumed task's last bundle as the chunks sent before its Assign, read from the
        store a part at a time."""
        async for p in chunks(artifacts.read_parts(self.store, task_id, "bundle", found)):
            yield m.AssignBlob(task_id=task_id, name="bundle", **p.fields())

    # ------------------------------------------------------------------ writes

    async def submit(
        self, owner: str, req: TaskRequest, *, admin: bool = False, idempotency_key: str | None = None
    ) -> tuple[TaskRecord, bool]:
        """Queue a task; (the task, whether it is a replay).  With an ``idempotency_key`` the
        same key from the same user gives the same task, however often and from whichever
        replica it is sent: the task id is derived from (user, key), so the store's primary
        key decides a race.  The same key with another request is refused (409: the key is
        bound to its request)."""
        req = validate_request(req)
        task_id = new_task_id()
        if idempotency_key is not None:
            task_id = idempotent_task_id(owner, idempotency_key)
            existing = await self.store.get_task(task_id)
            if existing is not None:
                return self._replayed(existing, owner, req), True
        if req.repo and not admin:
            kind = repos.classify(req.repo)
            if kind == "local":
                raise Forbidden("local paths and file:// repositories are for administrators; use a URL or owner/name")
            if kind == "url":
                try:
                    await repos.check_remote(req.repo, self.config.repo_hosts)
                except repos.RemoteRefused as exc:
                    raise Forbidden(str(exc)) from None
        rec = TaskRecord(id=task_id, owner=owner, state=State.QUEUED, request=req)
        try:
            rec, _ = await self.store.create_task(rec, event_in(rec.id, m.StateEvent(state=State.QUEUED)))
        except Conflict:  # the same key, sent twice at once: the other one created it
            existing = await self.store.get_task(task_id)
            if idempotency_key is None or existing is None:
                raise
            return self._replayed(existing, owner, req), True
        log.info("task %s queued by %s", rec.id, owner, extra={"task_id": rec.id})
        await self.bus.notify(SCHED_TOPIC)
        return rec, False

    async def replay(self, owner: str, req: TaskRequest, idempotency_key: str) -> TaskRecord | None:
        """The task an Idempotency-Key already made (checked before the submission rate limit:
        a retry of what was accepted costs nothing), or None."""
        existing = await self.store.get_task(idempotent_task_id(owner, idempotency_key))
        return self._replayed(existing, owner, validate_request(req)) if existing is not None else None

    @staticmethod
    def _replayed(existing: TaskRecord, owner: str, req: TaskRequest) -> TaskRecord:
        if existing.owner != owner:  # a 48-bit hash collision between two users' keys
            raise Conflict("this Idempotency-Key cannot be used; choose another")
        # field by field: a stored request is read with the protocol's lenient type, the new one is the API's
        if msgspec.structs.asdict(existing.request) != msgspec.structs.asdict(req):
            raise Conflict("this Idempotency-Key was used for a different request")
        return existing

    async def move(
        self,
        task_id: str,
        target: State,
        *,
        reason: str | None = None,
        message: str | None = None,
        changes: dict[str, Any] | None = None,
        expect: frozenset[State] | set[State] | None = None,
        expect_node: str | None = None,
        expect_attempt: int | None = None,
    ) -> TaskRecord | None:
        """Move a task to ``target`` if the lifecycle allows it from its current state.

        Returns the updated record, or None when the task is not in ``expect`` (or not on
        ``expect_node``) or the transition is illegal: callers race with each other and
        with nodes, and the loser simply does nothing.
        """
        for _ in range(10):
            rec = await self.store.get_task(task_id)
            if rec is None:
                return None
            if expect is not None and State(rec.state) not in expect:
                return None
            if expect_node is not None and rec.node_id != expect_node:
                return None
            if expect_attempt is not None and rec.attempt != expect_attempt:
                return None
            try:
                transition(rec.state, target)
            except IllegalTransition as exc:
                log.debug("task %s: %s", task_id, exc)
                return None
            cols: dict[str, Any] = {"state": str(target), "reason": reason, "message": message}
            if target in TERMINAL:
                cols["finished_at"] = time.time()
            cols.update(changes or {})
            ev = event_in(task_id, m.StateEvent(state=str(target), reason=reason, message=message))
            res = await self.store.update_task(task_id, expect_state=rec.state, changes=cols, event=ev)
            if res is not None:
                new, _ = res
                log.info(
                    "task %s: %s -> %s%s",
                    task_id,
                    rec.state,
                    target,
                    f" ({reason})" if reason else "",
                    extra={"task_id": task_id},
                )
                if target in TERMINAL:
                    self.metrics.task_ended(str(target), new.created_at, new.finished_at)
                await self.bus.notify(task_topic(task_id))
                if target in (State.QUEUED,) or target in TERMINAL:
                    await self.bus.notify(SCHED_TOPIC)
                return new
        return None

    async def requeue_or_fail(
        self, rec: TaskRecord, reason: str, message: str, *, free: bool = False
    ) -> TaskRecord | None:
        """A task lost its node (or was refused): queue it again, or fail it after max_attempts.
        A ``free`` requeue (its node shut down) is always queued again and not counted."""
        return await self.give_back(
            rec, give_back(active_task(rec), reason, message, self.config.max_attempts, free=free)
        )

    async def give_back(self, rec: TaskRecord, action: Requeue | Fail) -> TaskRecord | None:
        """Carry out a decision to requeue or fail ``rec`` (made by ``reconcile.give_back``)."""
        if isinstance(action, Fail):
            return await self.move(
                rec.id, State.FAILED, reason=action.reason, message=action.message, expect={action.state}
            )
        changes: dict[str, Any] = {"node_id": None}
        if action.free:
            changes["free_attempts"] = rec.free_attempts + 1
        return await self.move(
            rec.id, State.QUEUED, reason=action.reason, message=action.message, expect={action.state}, changes=changes
        )

    async def reply(self, task_id: str, answer: str, *, owner: str | None) -> TaskRecord:
        """Answer a task's question: it is queued again and continues on the same work."""
        if not answer.strip():
            raise InvalidRequest("the answer is empty")
        rec = await self.get(task_id, owner=owner)
        if rec.state != State.NEEDS_INPUT:
            raise Conflict(f"task {task_id} is {rec.state}, not waiting for an answer")
        new = await self.move(
            task_id,
            State.QUEUED,
            reason="reply",
            message="answered; queued again",
            expect={State.NEEDS_INPUT},
            changes={"reply": answer, "node_id": None},
        )
        if new is None:
            raise Conflict(f"task {task_id} changed while answering")
        return new

    async def cancel(self, task_id: str, *, owner: str | None, send_cancel) -> TaskRecord:
        """Cancel: a task not on a node ends at once; one on a node is cancelled there first.

        ``send_cancel(node_id, task_id) -> bool`` returns False when the node is not connected,
        in which case the task is ended here (the node, if it comes back, is told to drop it).
        """
        rec = await self.get(task_id, owner=owner)
        state = State(rec.state)
        if state in TERMINAL:
            return rec
        if state in (State.QUEUED, State.NEEDS_INPUT) or rec.node_id is None:
            new = await self.move(
                task_id, State.CANCELLED, reason="cancelled", message="cancelled by user", expect={state}
            )
            return new or await self.get(task_id)
        if await send_cancel(rec.node_id, task_id):
            return rec
        # not connected here: ended in the store, and the replica holding the node (if any) tells it
        new = await self.move(
            task_id,
            State.CANCELLED,
            reason="cancelled",
            message="cancelled by user",
            expect={state},
        )
        await self.bus.notify(CANCEL_TOPIC)
        return new or await self.get(task_id)

"""POST /v1/tasks with an Idempotency-Key: the same key gives the same task (however often, even
at once), another request under a used key is refused with 409, keys are per user."""

from __future__ import annotations

import os

import trio

from tests.harness import marathon_config, run_marathon, scratch_dir


async def test_the_same_key_gives_the_same_task():
    config = marathon_config(os.path.join(scratch_dir(), "data"), submit_burst=100)  # not what is tested here
    async with run_marathon(config, role="orchestrator") as mt:
        body = {"prompt": "fix the flaky test"}
        key = {"Idempotency-Key": "deploy-7f3a"}
        first = await mt.client.post("/v1/tasks", json=body, headers=key)
        assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
        again = await mt.client.post("/v1/tasks", json=body, headers=key)
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]

        # twenty at once with a new key: one task
        answers: list = []

        async def post():
            answers.append(await mt.client.post("/v1/tasks", json=body, headers={"Idempotency-Key": "burst"}))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(post)
        assert {r.status_code for r in answers} == {201}
        assert len({r.json()["id"] for r in answers}) == 1
        assert sum(1 for r in answers if "Idempotent-Replayed" not in r.headers) == 1

        # the same key for another request is refused; a bad key is a clear 400
        other = await mt.client.post("/v1/tasks", json={"prompt": "something else"}, headers=key)
        assert other.status_code == 409 and "different request" in other.json()["error"]["message"]
        bad = await mt.client.post("/v1/tasks", json=body, headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 400

        # without a key every submission is a task of its own
        ids = {(await mt.client.post("/v1/tasks", json=body)).json()["id"] for _ in range(3)}
        assert len(ids) == 3
        listed = (await mt.client.get("/v1/tasks", params={"limit": 100})).json()
        assert len(listed["tasks"]) == 5  # deploy-7f3a, burst, and the three without a key

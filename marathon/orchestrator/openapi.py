"""The OpenAPI document for /v1, generated from the same msgspec types the API decodes."""

from __future__ import annotations

from functools import lru_cache

import msgspec

from marathon import __version__
from marathon.orchestrator.identity import JoinTokenCreated, JoinTokenRequest
from marathon.store import TaskRecord, TaskRequest


def _op(summary: str, responses: dict, **extra) -> dict:
    return {"summary": summary, "responses": responses, **extra}


_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_TASK = {
    "description": "a task",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskRecord"}}},
}
_READY = {
    "type": "object",
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {
            "type": "object",
            "description": "each check (store, gateway, …): ok, failed or timeout",
            "additionalProperties": {"type": "string", "enum": ["ok", "failed", "timeout"]},
        },
    },
}
_ID = [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_NODE_ID = [
    {
        "name": "node",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the node's id, or its name when no other node has it",
    }
]
_NODE = {"description": "the node", "content": {"application/json": {"schema": {"type": "object"}}}}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    _, components = msgspec.json.schema_components(
        [TaskRequest, TaskRecord, JoinTokenRequest, JoinTokenCreated], ref_template="#/components/schemas/{name}"
    )
    components["Error"] = {
        "type": "object",
        "properties": {
            "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Marathon", "version": __version__},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": _op("Liveness", {"200": {"description": "ok"}}, security=[])},
            "/readyz": {
                "get": _op(
                    "Readiness: the store answers and the node gateway listens",
                    {
                        "200": {"description": "ready", "content": {"application/json": {"schema": _READY}}},
                        "503": {"description": "not ready", "content": {"application/json": {"schema": _READY}}},
                    },
                    security=[],
                )
            },
            "/metrics": {
                "get": _op(
                    "Prometheus metrics (text format 0.0.4): tasks by state, queue depth, scheduling latency, "
                    "task duration by outcome, tokens and cost by model, connected nodes, store latency",
                    {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                    security=[],
                )
            },
            "/v1/tasks": {
                "post": _op(
                    "Submit a task",
                    {"201": _TASK, "400": _ERR, "401": _ERR, "429": _ERR},
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}},
                    },
                ),
                "get": _op(
                    "List tasks (newest first)",
                    {"200": {"description": "a page of tasks"}, "400": _ERR, "401": _ERR},
                    parameters=[
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "comma-separated states",
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    ],
                ),
            },
            "/v1/tasks/{task_id}": {"get": _op("Get a task", {"200": _TASK, "404": _ERR}, parameters=_ID)},
            "/v1/tasks/{task_id}/cancel": {"post": _op("Cancel a task", {"202": _TASK, "404": _ERR}, parameters=_ID)},
            "/v1/tasks/{task_id}/diff": {
                "get": _op(
                    "The change as a patch",
                    {"200": {"description": "patch", "content": {"text/x-diff": {}}}, "404": _ERR},
                    parameters=_ID,
                )
            },
            "/v1/tasks/{task_id}/events": {
                "get": _op(
                    "Task events as Server-Sent Events; resume with Last-Event-ID",
                    {"200": {"description": "event stream", "content": {"text/event-stream": {}}}, "404": _ERR},
                    parameters=_ID
                    + [
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                        {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    ],
                )
            },
            "/v1/nodes": {
                "get": _op(
                    "Nodes and their capacity; administrators also see every node's tasks and address, "
                    "other users only their own tasks and no addresses",
                    {"200": {"description": "nodes"}, "401": _ERR},
                )
            },
            "/v1/nodes/{node}/drain": {
                "post": _op(
                    "Drain a node (administrators): it takes no new tasks; what runs there runs to its end",
                    {"200": _NODE, "401": _ERR, "403": _ERR, "404": _ERR},
                    parameters=_NODE_ID,
                )
            },
            "/v1/nodes/join-tokens": {
                "post": _op(
                    "Make a one-time join token a new node enrols with (administrators); shown once",
                    {
                        "201": {
                            "description": "the token",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/JoinTokenCreated"}}
                            },
                        },
                        "400": _ERR,
                        "401": _ERR,
                        "403": _ERR,
                    },
                    requestBody={
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JoinTokenRequest"}}}
                    },
                )
            },
            "/v1/nodes/{node}/revoke": {
                "post": _op(
                    "Revoke a node's credential (administrators): it is disconnected at once and refused from "
                    "then on; its tasks go back as a lost node's",
                    {
                        "200": {
                            "description": "revoked",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "id": {"type": "string"},
                                            "revoked": {"type": "boolean", "description": "it had a credential"},
                                            "disconnected": {"type": "boolean"},
                                        },
                                    }
                                }
                            },
                        },
                        "401": _ERR,
                        "403": _ERR,
                        "404": _ERR,
                    },
                    parameters=_NODE_ID,
                )
            },
            "/v1/nodes/{node}/undrain": {
                "post": _op(
                    "Undrain a node (administrators): it takes tasks again",
                    {"200": _NODE, "401": _ERR, "403": _ERR, "404": _ERR},
                    parameters=_NODE_ID,
                )
            },
        },
    }

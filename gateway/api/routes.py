"""Every route of the gateway, in one place."""

from __future__ import annotations

from aiohttp import web

from gateway.api import admin, batches, console, files, health, messages, models, openai


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/embeddings", openai.embeddings)
    app.router.add_post("/v1/responses", openai.responses)
    # The anthropic SDK appends /v1/messages to its base_url: the gateway's root, or its /anthropic prefix.
    for prefix in ("", "/anthropic"):
        app.router.add_post(f"{prefix}/v1/messages", messages.create_message)
        app.router.add_post(f"{prefix}/v1/messages/count_tokens", messages.count_tokens)
    app.router.add_post("/v1/files", files.create_file)
    app.router.add_get("/v1/files", files.list_files)
    app.router.add_get("/v1/files/{file_id}", files.retrieve_file)
    app.router.add_delete("/v1/files/{file_id}", files.delete_file)
    app.router.add_get("/v1/files/{file_id}/content", files.file_content)
    app.router.add_post("/v1/batches", batches.create_batch)
    app.router.add_get("/v1/batches", batches.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", batches.retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batches.cancel_batch)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.get_model)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/admin/policy", admin.admin_policy)
    app.router.add_post("/admin/reload", admin.admin_reload)
    app.router.add_get("/admin/limits", admin.admin_limits)
    console.add_routes(app)

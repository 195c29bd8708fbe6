"""Run-time banks and experts over HTTP, in vLLM's request shape (issue 39):

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PATH}
        PATH a PEFT LoRA folder, or a bank file holding an expert NAME (or one expert): expert
        NAME added to the bank, or replacing the one of that name; with "bank": true, PATH is a
        bank file (or a shipped bank's name) that replaces the whole bank (NAME: a label)
    POST /v1/unload_lora_adapter  {"lora_name": NAME}
        expert NAME removed (the bank's last: the bank); with "bank": true the bank is unloaded

Answers 200 {"status": "ok", "experts": [...], "models": [...]}: the bank's experts and the model
ids now served (``ID:<expert>``; ``ID:auto`` / ``ID:token`` while the bank has those routers).
A bad body, file or name is one 400 naming it, and the bank stays as it was.  Guarded by the API
key like every other path.

Requests in flight keep the bank they started with: the change closes the gate (requests arriving
meanwhile wait before they are parsed, so they are checked against the new bank), waits until
every admitted request has finished (at most the server's request timeout), swaps the bank in a
worker thread (runtime/banks.py: the prefix cache emptied, its keys by content hash), rebuilds the
model ids and opens the gate.  One change at a time.
"""
from __future__ import annotations

import asyncio
import time

from pf_engine.errors import PFError
from pf_engine.serve.protocol import APIError, Catalog, bad


class Changes:
    """The gate and the lock of a Server's run-time bank changes."""

    def __init__(self):
        self.open = asyncio.Event()
        self.open.set()
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        """Before a request is parsed: wait while a change runs."""
        await self.open.wait()


def _body(body, need_path: bool) -> tuple[str, str | None, bool]:
    if not isinstance(body, dict):
        raise bad("body", "expected a JSON object with lora_name"
                  + (" and lora_path" if need_path else ""))
    name, path, whole = body.get("lora_name"), body.get("lora_path"), body.get("bank", False)
    if not isinstance(name, str) or not name:
        raise bad("lora_name", f"expected a non-empty string, got {name!r}")
    if need_path and (not isinstance(path, str) or not path):
        raise bad("lora_path", f"expected a path (a PEFT folder or a bank file), got {path!r}")
    if not isinstance(whole, bool):
        raise bad("bank", f"expected true or false, got {whole!r}")
    return name, path, whole


async def change(server, body, load: bool) -> dict:
    """A load (``load``) or unload request's answer, the change made between requests."""
    name, path, whole = _body(body, load)
    eng = server.engine
    if load and whole:
        fn = lambda: eng.load_bank(path)                     # noqa: E731
    elif load:
        fn = lambda: eng.load_expert(name, path)             # noqa: E731
    elif whole:
        fn = eng.unload_bank
    else:
        fn = lambda: eng.unload_expert(name)                 # noqa: E731
    ch = server.changes
    async with ch.lock:
        ch.open.clear()
        try:
            await _drain(server)
            try:
                await asyncio.to_thread(fn)
            except (PFError, OSError, ValueError) as e:
                raise bad("lora_path" if load else "lora_name", str(e).splitlines()[0]) from None
            server.catalog = Catalog(server.catalog.base, eng.bank)
        finally:
            ch.open.set()
    return {"status": "ok", "experts": list(eng.bank.expert_names) if eng.bank else [],
            "models": server.catalog.ids()}


async def _drain(server, every_s: float = 0.01) -> None:
    """Until no admitted request runs or waits (the gate is closed: none joins), or 503 after
    the server's request timeout."""
    deadline = time.monotonic() + server.timeout_s
    while server.reserved() or server.engine.scheduler().pending():
        if time.monotonic() > deadline:
            raise APIError(503, f"requests still in flight after {server.timeout_s:g} s: the "
                           "bank was not changed", None, "server_error", "busy")
        await asyncio.sleep(every_s)

"""`nextn serve`: settings from the plan's `server:` section and the command line, the model loaded
in the background (/health answers 503 until it is ready), uvicorn in front.

SIGINT / SIGTERM: uvicorn stops accepting connections; the slot scheduler ends every in-flight
generation at once, so open streams get their last chunk and `[DONE]`; the process exits 0.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path

from ..errors import NextnError


class _Server:
    """uvicorn.Server that also ends the generations when a signal asks it to exit (uvicorn alone
    would wait for open streams to finish), and exits 0 after it: uvicorn re-raises the signal
    once it has shut down, which would end the process with 128+signal."""

    def __new__(cls, config, on_exit):
        import uvicorn

        class S(uvicorn.Server):
            def handle_exit(self, sig, frame):
                on_exit()
                super().handle_exit(sig, frame)
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

        return S(config)


def serve(target, *, overrides: dict, server: dict, engine_kw: dict) -> int:
    """Run the server until a signal; `server` holds the command line's server settings (None:
    from the plan), `overrides` the plan overrides of `nextn run`."""
    import placement
    import uvicorn

    from ..api import DEMO_PLAN, engine_from_plan
    from ..config import read_config
    from ..gguf_file import GGUFFile
    from .app import ServerState, create_app
    from .slots import Scheduler

    path = Path(target) if target else DEMO_PLAN
    if path.suffix in (".yaml", ".yml"):
        plan = placement.load_plan(path, overrides)
    else:
        plan = placement.load_plan(None, {**overrides, "model": str(path)})
    if plan.model_path is None:
        raise NextnError(f"{plan.source}: no model given (set `model:` in the plan or pass a .gguf path)")
    s = plan.server
    s = replace(s, **{k: v for k, v in server.items() if v is not None})
    cfg = read_config(GGUFFile(plan.model_path))  # reads the header only: the context is needed now
    total = s.ctx_size or plan.context_for(cfg.context_length)
    per_slot = total // s.parallel
    if per_slot < 16:
        raise NextnError(f"ctx_size {total} split over {s.parallel} slots leaves {per_slot} tokens per slot "
                         f"(at least 16 needed)")
    plan = replace(plan, context=per_slot)
    queue = 4 * s.parallel if s.queue is None else s.queue
    alias = s.alias or Path(plan.model_path).stem
    state = ServerState(alias=alias, api_key=s.api_key,
                        max_tokens=engine_kw.pop("max_tokens", None)
                        or (plan.sampling.max_tokens if "sampling.max_tokens" in plan.where else None))
    app = create_app(state)
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    failed: list[str] = []
    srv = None

    def on_exit():
        if state.scheduler is not None:
            state.scheduler.shutdown(wait=0)

    def load():
        try:
            # one KV pool for all slots: the context of every slot together (llama-server's -c)
            eng = engine_from_plan(plan, progress=False, kv_slots=per_slot * s.parallel, **engine_kw)
            sch = Scheduler(eng, s.parallel, queue)
            sch.start()
            state.engine, state.scheduler = eng, sch
        except NextnError as e:
            failed.append(str(e))
            srv.should_exit = True
            return
        except Exception as e:  # noqa: BLE001 - reported, and the server exits
            import traceback

            traceback.print_exc()
            failed.append(f"{type(e).__name__}: {e}")
            srv.should_exit = True
            return
        sp = plan.speculative
        if eng.has_mtp and sp.mtp is not False:
            mtp = f"MTP on (draft_max {sp.draft_max}{', adaptive' if sp.adaptive else ''})"
        else:
            mtp = "MTP off" + ("" if eng.has_mtp else " (the model has no nextn layer)")
        print(f"nextn serve: listening on http://{s.host}:{srv_port()}, model {alias}, {s.parallel} slot(s), "
              f"context {eng.context} per slot, {mtp}, queue {queue}, plan {plan.source}"
              + (", API key required" if s.api_key else ""), file=sys.stderr, flush=True)

    def srv_port():
        try:
            return srv.servers[0].sockets[0].getsockname()[1]
        except (AttributeError, IndexError):
            return s.port

    srv = _Server(config, on_exit)
    print(f"nextn serve: loading {plan.model_path} ...", file=sys.stderr, flush=True)

    loader = threading.Thread(target=load, name="nextn-load", daemon=True)
    orig_startup = srv.startup

    async def startup(sockets=None):  # load once the port is bound, so /health can say 503
        await orig_startup(sockets)
        if not srv.should_exit:
            loader.start()

    srv.startup = startup
    try:
        srv.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind (it has logged why)
        raise NextnError(f"could not listen on {s.host}:{s.port}") from None
    if state.scheduler is not None:
        state.scheduler.shutdown()
    if failed:
        raise NextnError(failed[0])
    print("nextn serve: stopped", file=sys.stderr, flush=True)
    return 0

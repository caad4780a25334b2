"""``loramerge serve``: the OpenAI-compatible server with per-request adapter composition.

Mounted by the main CLI (``app.command("serve")(serve)``); also runnable as
``python -m loramerge.serving.cli --base MODEL --adapters code=DIR math=DIR ...``. Nothing heavy is
imported until the command runs (``loramerge --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from loramerge.errors import BaseModelError, LoramergeError, OptionError, RecipeError

app = typer.Typer(help="Serve LoRA adapters with per-request composition (OpenAI-compatible).",
                  no_args_is_help=True, add_completion=False)

BACKENDS = ("auto", "vllm", "peft")
BASE_ROWS = ("auto", "zero-adapter", "none")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_adapter_pairs(pairs: list[str]) -> dict[str, Path]:
    """``name=path`` strings into a dict (the project's one pair parser); a bad pair is a usage error."""
    from loramerge.core.names import parse_pairs

    try:
        return {name: Path(path) for name, path in parse_pairs(pairs, option="--adapters").items()}
    except RecipeError as exc:
        raise typer.BadParameter(f"{exc.message} ({exc.fix})" if exc.fix else exc.message,
                                 param_hint="--adapters") from None


def split_positional(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words: ``NAME=PATH`` adapters (``--adapters a=x b=y``), then from the first ``-``-word on
    (what follows ``--``) the options forwarded to vLLM's own argument parser."""
    for i, item in enumerate(items):
        if item.startswith("-"):
            return items[:i], items[i:]
    return list(items), []


def check_base_model(base: str) -> None:
    """A local base model must exist (a hub id is left to the backend); checked before any work."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise BaseModelError("the base model is not a model directory (no config.json)", path=str(path),
                                 fix="pass --base a directory saved by save_pretrained, or a hub id")
        return
    if _HUB_ID.match(base) and not base.startswith("."):
        return
    raise BaseModelError("the base model does not exist", path=str(path),
                         fix="pass --base an existing model directory (or a hub id such as org/name)")


def load_router(path: Path, base: str | None = None) -> Any:
    """A router artifact from ``loramerge.routers`` (anything with ``route(prompts) -> [{name: weight}]``).

    Routers that embed prompts with the base model's hidden states get the base model (transformers) here.
    """
    try:
        from loramerge.routers import load_router as load
    except ImportError as exc:
        raise typer.BadParameter(f"this loramerge has no router loader ({exc})", param_hint="--router") from exc
    router = load(path)
    if getattr(router, "embedder", None) is None and (getattr(router, "embedder_spec", {}) or {}).get("kind") == "pooled":
        if base is None:
            raise typer.BadParameter("this router embeds prompts with the base model: pass --base", param_hint="--router")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base).eval()
        router = load(path, model=model, tokenizer=AutoTokenizer.from_pretrained(base))
    if not callable(getattr(router, "route", None)):
        raise typer.BadParameter(f"{path} did not load as a router with route(prompts)", param_hint="--router")
    return router


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from .vllm_engine import vllm_available

    return "vllm" if vllm_available() else "peft"


def build_engine(
    *, base: str, adapters: dict[str, Path], roots: list[Path], router: Any, backend: str, served_name: str,
    max_lora_rank: int, max_loras: int, max_cpu_loras: int | None, max_model_len: int | None, dtype: str,
    cache_dir: Path | None, cache_size: int, enforce_eager: bool, base_rows: str,
    engine_args: dict | None = None, max_body_bytes: int | None = None,
) -> Any:
    """The composer and the engine for ``backend`` (``vllm``, ``peft`` or ``auto``: vLLM when installed).

    ``engine_args``: further vLLM engine arguments (already validated by
    :func:`loramerge.serving.vllm_engine.parse_engine_args`). On failure nothing is left behind.
    """
    from .bounds import Bounds
    from .catalog import AdapterCatalog
    from .composer import Composer

    backend = resolve_backend(backend)
    if engine_args and backend != "vllm":
        raise OptionError("engine options apply to the vLLM backend only",
                          fix="drop --engine-arg (and what follows --), or pass --backend vllm")
    bounds = Bounds(max_body_bytes=max_body_bytes) if max_body_bytes else Bounds()
    catalog = AdapterCatalog(adapters, roots, bounds=bounds)
    composer = Composer(catalog, max_rank=max_lora_rank if backend == "vllm" else None, cache_dir=cache_dir,
                        cache_size=cache_size, router=router, base_model=base, base_names=(served_name, base))
    try:
        if backend == "peft":
            from .peft_engine import PeftEngine

            return PeftEngine(composer, base, max_model_len=max_model_len)
        from .vllm_engine import AsyncVLLMEngine, VLLMSettings

        settings = VLLMSettings(model=base, max_lora_rank=max_lora_rank, max_loras=max_loras,
                                max_cpu_loras=max_cpu_loras, dtype=dtype, max_model_len=max_model_len,
                                enforce_eager=enforce_eager, extra=dict(engine_args or {}))
        return AsyncVLLMEngine(composer, settings, base_rows=base_rows)  # type: ignore[arg-type]
    except LoramergeError:
        composer.close()
        raise
    except Exception as exc:  # transformers / tokenizer loading: the base model is unusable
        composer.close()
        raise BaseModelError(f"could not load the base model or its tokenizer: {type(exc).__name__}: {exc}",
                             path=str(base), fix="pass --base a directory saved by save_pretrained "
                             "(config, weights and tokenizer)") from exc
    except BaseException:
        composer.close()
        raise


@app.command(context_settings={"allow_interspersed_args": True})
def serve(
    positional: list[str] = typer.Argument(None, metavar="[NAME=PATH]... [-- VLLM_OPTION...]", show_default=False,
                                           help="More adapters (so `--adapters a=x b=y` works); after `--`, "
                                           "options for vLLM's own engine parser, e.g. -- --tensor-parallel-size 2."),
    base: str = typer.Option(..., "--base", help="Base model: a local directory (or hub id where allowed)."),
    adapters: list[str] = typer.Option([], "--adapters", "-a", help="NAME=PATH; repeatable, or several after one "
                                       "--adapters."),
    adapter_root: list[Path] = typer.Option([], "--adapter-root", help="Directory whose subdirectories are "
                                            "adapters (and bundles) served by name; repeatable."),
    router: Path | None = typer.Option(None, "--router", help="Router artifact directory: enables model='auto'."),
    backend: str = typer.Option("auto", "--backend", help="vllm, peft (transformers reference) or auto."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    served_name: str = typer.Option("base", "--served-name", help="The base model's name in /v1/models."),
    max_lora_rank: int = typer.Option(16, "--max-lora-rank", help="vLLM's max_lora_rank; larger compositions "
                                      "are truncated by the factored SVD (reported per response)."),
    max_loras: int = typer.Option(4, "--max-loras", help="vLLM adapter slots (distinct compositions per batch)."),
    max_cpu_loras: int | None = typer.Option(None, "--max-cpu-loras"),
    max_model_len: int | None = typer.Option(None, "--max-model-len"),
    dtype: str = typer.Option("auto", "--dtype"),
    engine_arg: list[str] = typer.Option([], "--engine-arg", help="KEY=VALUE for vLLM's engine (any EngineArgs "
                                         "field: tensor_parallel_size=2, gpu_memory_utilization=0.85, ...); "
                                         "repeatable; checked by vLLM's own parser."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where composed adapters are written "
                                          "(default: a temporary directory removed at exit). Several servers "
                                          "may share one."),
    cache_size: int = typer.Option(64, "--cache-size", help="Composed adapters kept on disk (LRU)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager"),
    base_rows: str = typer.Option("auto", "--base-rows", help="vLLM CPU workaround for base-model rows in "
                                  "mixed batches: auto, zero-adapter or none."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Larger request bodies get 413."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Start the server. ``model`` in a request: an adapter name, ``mix:a=0.7,b=0.3``, ``basis:DIR/task`` or ``auto``."""
    from loramerge.cli.common import fail
    from loramerge.cli.options import check_choice

    try:
        import uvicorn
    except ImportError:
        fail(LoramergeError("the server needs uvicorn, which is not installed", fix="pip install 'loramerge[serve]'"))
    pairs, forwarded = split_positional(list(positional or []))
    try:
        check_choice(backend, BACKENDS, "--backend")
        check_choice(base_rows, BASE_ROWS, "--base-rows")
        check_base_model(base)
        named = parse_adapter_pairs([*adapters, *pairs])
        engine_args: dict = {}
        if engine_arg or forwarded:
            from .vllm_engine import parse_engine_args

            engine_args = parse_engine_args(engine_arg, forwarded)
        engine = build_engine(
            base=base, adapters=named, roots=list(adapter_root),
            router=load_router(router, base) if router else None, backend=backend, served_name=served_name,
            max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len, dtype=dtype, cache_dir=cache_dir, cache_size=cache_size,
            enforce_eager=enforce_eager, base_rows=base_rows, engine_args=engine_args, max_body_bytes=max_body_bytes,
        )
    except LoramergeError as exc:
        fail(exc)
        raise  # fail() ends the command; this line is never reached
    from .server import create_app

    with _terminated_cleanly():
        try:
            uvicorn.run(create_app(engine, served_name=served_name), host=host, port=port, log_level=log_level)
        finally:
            engine.close()  # the temporary composition directory goes with the server


class _Terminated(Exception):
    """SIGTERM after uvicorn's graceful shutdown (uvicorn re-raises the signal it caught)."""


@contextlib.contextmanager
def _terminated_cleanly() -> Iterator[None]:
    """Turn SIGTERM into a normal exit, so cleanup runs (the default handler would end the process first)."""
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    app()

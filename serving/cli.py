"""``loramerge serve``: the OpenAI-compatible server with per-request adapter composition.

Mounted by the main CLI (``app.command("serve")(serve)``); also runnable as
``python -m loramerge.serving.cli --base MODEL --adapters code=DIR ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Serve LoRA adapters with per-request composition (OpenAI-compatible).",
                  no_args_is_help=True, add_completion=False)


def parse_adapter_pairs(pairs: list[str]) -> dict[str, Path]:
    """``name=path`` strings into a dict; a bad pair is a usage error naming the pair."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, eq, path = pair.partition("=")
        if not eq or not name or not path:
            raise typer.BadParameter(f"'{pair}' is not NAME=PATH", param_hint="--adapters")
        if name in out:
            raise typer.BadParameter(f"adapter name '{name}' given twice", param_hint="--adapters")
        out[name] = Path(path)
    return out


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


def build_engine(
    *, base: str, adapters: dict[str, Path], roots: list[Path], router: Any, backend: str, served_name: str,
    max_lora_rank: int, max_loras: int, max_cpu_loras: int | None, max_model_len: int | None, dtype: str,
    cache_dir: Path | None, cache_size: int, enforce_eager: bool, base_rows: str,
) -> Any:
    """The composer and the engine for ``backend`` (``vllm``, ``peft`` or ``auto``: vLLM when installed)."""
    from .compose import AdapterCatalog, Composer

    if backend == "auto":
        try:
            import vllm  # noqa: F401
            backend = "vllm"
        except ImportError:
            backend = "peft"
    catalog = AdapterCatalog(adapters, roots)
    composer = Composer(catalog, max_rank=max_lora_rank if backend == "vllm" else None, cache_dir=cache_dir,
                        cache_size=cache_size, router=router, base_model=base, base_names=(served_name, base))
    if backend == "peft":
        from .engine import PeftEngine

        return PeftEngine(composer, base, max_model_len=max_model_len)
    from .engine import AsyncVLLMEngine, VLLMSettings

    settings = VLLMSettings(model=base, max_lora_rank=max_lora_rank, max_loras=max_loras,
                            max_cpu_loras=max_cpu_loras, dtype=dtype, max_model_len=max_model_len,
                            enforce_eager=enforce_eager)
    return AsyncVLLMEngine(composer, settings, base_rows=base_rows)  # type: ignore[arg-type]


@app.command()
def serve(
    base: str = typer.Option(..., "--base", help="Base model: a local directory (or hub id where allowed)."),
    adapters: list[str] = typer.Option([], "--adapters", "-a", help="NAME=PATH, repeatable."),
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
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where composed adapters are written "
                                             "(default: a temporary directory removed at exit)."),
    cache_size: int = typer.Option(64, "--cache-size", help="Composed adapters kept on disk (LRU)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager"),
    base_rows: str = typer.Option("auto", "--base-rows", help="vLLM CPU workaround for base-model rows in "
                                  "mixed batches: auto, zero-adapter or none."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Start the server. ``model`` in a request: an adapter name, ``mix:a=0.7,b=0.3``, ``basis:DIR/task`` or ``auto``."""
    try:
        import uvicorn
    except ImportError as exc:
        raise typer.BadParameter("uvicorn is not installed: pip install 'loramerge[serve]'") from exc
    from loramerge.errors import LoramergeError

    from .server import create_app

    try:
        from loramerge.cli.options import check_choice

        check_choice(backend, ("auto", "vllm", "peft"), "--backend")
        check_choice(base_rows, ("auto", "zero-adapter", "none"), "--base-rows")
        engine = build_engine(
            base=base, adapters=parse_adapter_pairs(adapters), roots=list(adapter_root),
            router=load_router(router, base) if router else None, backend=backend, served_name=served_name,
            max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len, dtype=dtype, cache_dir=cache_dir, cache_size=cache_size,
            enforce_eager=enforce_eager, base_rows=base_rows,
        )
    except LoramergeError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(exc.exit_code) from None
    try:
        uvicorn.run(create_app(engine, served_name=served_name), host=host, port=port, log_level=log_level)
    finally:
        engine.close()


if __name__ == "__main__":
    app()

"""``lora-export web DIR``: write the browser page beside a genai decoder directory (``lora_export.web.page``) and
serve it on 127.0.0.1 until Ctrl-C (or ``--stop-after`` seconds); ``--no-serve`` only writes it.

Importing this module registers the command on ``export_cli``."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import Terminated
from ..web.page import open_server, page_url, plan_page, serve, write_page
from .export_commands import export_cli, progress_printer
from .options import exit_on_error

DEFAULT_PORT = 8000


@export_cli.command("web")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port on 127.0.0.1 to serve on (0: a free one).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="Another .onnx_adapter the page may select (adapter-form decoders; repeatable). The directory's "
                   "own model.onnx_adapter is always offered.")
@click.option("--ort-dir", type=click.Path(path_type=Path), default=None,
              help="onnxruntime-web's dist/ folder [default: lora_export/web/node_modules/onnxruntime-web/dist, "
                   "from `npm ci --prefix lora_export/web`].")
@click.option("--no-serve", is_flag=True, help="Only write the page (DIR/web/); serve it with any static server.")
@click.option("--stop-after", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop serving after this many seconds [default: at Ctrl-C].")
@click.option("--quiet", is_flag=True, help="Only the page's address.")
@exit_on_error
def web_command(model_dir: Path, port: int, adapters: tuple[Path, ...], ort_dir: Path | None, no_serve: bool,
                stop_after: float | None, quiet: bool) -> None:
    """Write a page that runs the genai decoder in MODEL_DIR in the browser (onnxruntime-web: WASM, or WebGPU where
    present) into MODEL_DIR/web/, then serve MODEL_DIR on 127.0.0.1 (the page at /web/)."""
    plan = plan_page(model_dir, adapters=adapters, ort_dir=ort_dir)
    server = None if no_serve else open_server(model_dir, port)
    try:
        page = write_page(plan, progress_printer(quiet))
        if server is None:
            click.echo(f"wrote {page.parent}/ (serve {model_dir} with any static server and open web/)")
            return
        click.echo(f"serving {page_url(server)} (Ctrl-C stops)")
    except BaseException:
        if server is not None:
            server.server_close()
        raise
    try:
        serve(server, stop_after)
    except KeyboardInterrupt as err:  # Ctrl-C is how a server is stopped: exit 0; SIGTERM keeps its own exit
        if isinstance(err, Terminated):
            raise
    click.echo("stopped", err=True)

"""`align cache ls | info KEY | verify KEY | rm KEY [--root DIR]`: look after the embedding cache."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import console, user_errors

ROOT_HELP = "Cache root folder (cache_root of the embed config)."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def register(app: typer.Typer) -> None:
    """Add the `align cache` command group."""
    group = typer.Typer(help="List, inspect, verify and remove cached embeddings.", no_args_is_help=True)
    app.add_typer(group, name="cache")

    @group.command("ls")
    @user_errors
    def ls_command(root: Path = typer.Option(Path("data/cache"), "--root", help=ROOT_HELP)) -> None:
        """One row per cache: key, size, counts, encoders, dataset."""
        from rich.table import Table

        from align.cache import list_caches

        entries = list_caches(root)
        if not entries:
            console.print(f"no caches under {root} (make one with `align embed --config FILE`)", highlight=False)
            return
        table = Table(title=f"embedding caches under {root}", title_justify="left", header_style="bold")
        for column in ("key", "size", "images", "captions", "skipped", "encoders (image / text)", "dataset",
                       "split", "dtype", "status"):
            table.add_column(column, justify="right" if column in ("size", "images", "captions", "skipped") else "left",
                             overflow="fold")
        for e in entries:
            encoders = f"{e['image_encoder']}\n{e['text_encoder']}" if "image_encoder" in e else "—"
            table.add_row(e["key"], _size(e["bytes"]), str(e.get("images", "—")), str(e.get("captions", "—")),
                          str(e.get("skipped", "—")), encoders, e.get("dataset", "—"), e.get("split", "—"),
                          e.get("dtype", "—"), "ok" if e["status"] == "ok" else "[yellow]incomplete[/]")
        console.print(table)

    @group.command("info")
    @user_errors
    def info_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
                     root: Path = typer.Option(Path("data/cache"), "--root", help=ROOT_HELP)) -> None:
        """The manifest of one cache: counts, encoders, files, skipped items, timing."""
        from align.cache import read_manifest, resolve_cache
        from align.errors import AlignError

        path = resolve_cache(root, key)
        manifest = read_manifest(path)
        if manifest is None:
            raise AlignError(f"{path} has no valid manifest: the run did not finish (run `align embed` again)")
        shown = {k: v for k, v in manifest.items() if k not in ("config", "identity", "skipped")}
        shown["skipped"] = manifest["skipped"][:20] + ([f"... {len(manifest['skipped']) - 20} more"]
                                                       if len(manifest["skipped"]) > 20 else [])
        console.print(f"[bold]{path}[/]", highlight=False)
        console.print_json(json.dumps(shown))

    @group.command("verify")
    @user_errors
    def verify_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
                       root: Path = typer.Option(Path("data/cache"), "--root", help=ROOT_HELP)) -> None:
        """Recompute checksums and check shapes, dtypes and indices against the manifest."""
        from align.cache import resolve_cache, verify_cache
        from align.errors import AlignError

        path = resolve_cache(root, key)
        problems = verify_cache(path)
        if problems:
            for problem in problems:
                console.print(f"  {problem}", highlight=False)
            raise AlignError(f"cache {path.name} failed verification ({len(problems)} problem(s)): "
                             f"remove it (`align cache rm {path.name}`) and embed again")
        console.print(f"ok: {path.name} matches its manifest", highlight=False)

    @group.command("rm")
    @user_errors
    def rm_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
                   root: Path = typer.Option(Path("data/cache"), "--root", help=ROOT_HELP)) -> None:
        """Delete one cache folder."""
        from align.cache import remove_cache

        console.print(f"removed {remove_cache(root, key)}", highlight=False)

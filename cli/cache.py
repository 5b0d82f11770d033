"""`align cache ls | info KEY | verify KEY | rm KEY [--root DIR]`: look after the embedding cache;
`align cache import SOURCE|--image F --text F --name NAME`: make a cache from embeddings computed elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from align.cli.common import console, user_errors
from align.common.paths import cache_dir

ROOT_HELP = "Cache root folder (cache_root of the embed config; default: $ALIGN_HOME/cache, else data/cache)."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_info(path: Path, m: dict) -> None:

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    counts, dims = m["counts"], m["dims"]
    run, timing = m.get("run") or {}, m.get("timing") or {}  # written by every embed; optional for the checks
    grid.add_row("key", m["key"])
    grid.add_row("folder", str(path))
    grid.add_row("dataset", f"{m['dataset']['name']} ({m['dataset']['kind']}), split {m['split']}: "
                            f"{m['dataset']['images_in_source']} images, {m['dataset']['captions_in_source']} "
                            f"captions in the source")
    grid.add_row("encoders", f"image {m['encoders']['image']} ({dims['image']}-d)\n"
                             f"text  {m['encoders']['text']} ({dims['text']}-d)")
    grid.add_row("cached", f"{counts['images']} images, {counts['captions']} captions; {counts['skipped_images']} "
                           f"unreadable images skipped, {counts.get('dropped_captions', 0)} of their captions dropped")
    if isinstance(m.get("classes"), dict):  # a labelled set: class labels and zero-shot prompt embeddings
        classes = m["classes"]
        grid.add_row("classes", f"{len(classes['names'])} ({', '.join(classes['names'][:12])}), "
                                f"{len(classes['templates'])} zero-shot prompt templates")
    grid.add_row("storage", f"{m['storage_dtype']}, normalize {str(m['normalize']).lower()}, created "
                            f"{m.get('created', '?')}")
    if run:
        grid.add_row("run", ", ".join(f"{k.replace('_size', '').replace('_', ' ')} {str(v).lower()}"
                                      for k, v in run.items()))
    if timing:
        grid.add_row("encoding", f"images {timing['image_encode_s']:.1f} s ({timing['images_per_s']:.1f}/s), "
                                 f"captions {timing['text_encode_s']:.1f} s ({timing['captions_per_s']:.1f}/s)")
    if isinstance(m.get("source"), dict):  # an imported cache: where its embeddings came from
        grid.add_row("imported", ", ".join(f"{k} {v}" for k, v in m["source"].items() if v is not None))
    grid.add_row("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v))
    console.print(grid, highlight=False)
    files = Table(header_style="bold", title="files", title_justify="left")
    for column in ("file", "shape", "dtype", "size", "sha256"):
        files.add_column(column, no_wrap=column != "sha256", overflow="fold")
    for name, info in m["files"].items():
        files.add_row(name, "×".join(map(str, info["shape"])), info["dtype"], _size(info["bytes"]), info["sha256"])
    console.print(files)
    if m.get("skipped"):
        console.print(f"[bold]skipped images[/] ({len(m['skipped'])}):")
        for item in m["skipped"][:20]:
            console.print(f"  {item['index']}  {item['image_id']}: {item['reason']}", highlight=False)
        if len(m["skipped"]) > 20:
            console.print(f"  ... {len(m['skipped']) - 20} more (manifest.json lists all)")


def _root(root: Optional[Path]) -> Path:
    return cache_dir() if root is None else root


def _print_list(root: Path, entries: list[dict]) -> None:
    """One row per cache: key, size, counts, encoders, dataset."""
    table = Table(title=f"embedding caches under {root}", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, show_lines=False)
    table.add_column("key", overflow="fold", min_width=16, ratio=3)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("counts", justify="right", no_wrap=True)
    table.add_column("encoders (image / text)", overflow="fold", min_width=20, ratio=4)
    table.add_column("dataset", overflow="fold", min_width=10, ratio=2)
    for e in entries:
        key = e["key"] if e["status"] == "ok" else f"{e['key']}\n[yellow]{e['status']}[/]"
        if "images" not in e:
            table.add_row(key, _size(e["bytes"]), "—", "—", "—")
            continue
        counts = f"{e['images']} images\n{e['captions']} captions\n{e['skipped']} skipped"
        dataset = e["dataset"] if e["split"] in e["dataset"] else f"{e['dataset']} [{e['split']}]"
        table.add_row(key, f"{_size(e['bytes'])}\n{e['dtype']}", counts,
                      f"{e['image_encoder']}\n{e['text_encoder']}", dataset)
        table.add_section()
    console.print(table)


@user_errors
def ls_command(root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP)) -> None:
    """One row per cache: key, size, counts, encoders, dataset."""
    from align.cache.store import list_caches  # loads torch: not for --help

    root = _root(root)
    entries = list_caches(root)
    if not entries:
        console.print(f"no caches under {root} (make one with `align embed --config FILE` or `align cache import`)",
                      highlight=False)
        return
    _print_list(root, entries)


@user_errors
def info_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
                 root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP)) -> None:
    """The manifest of one cache: counts, encoders, files, skipped items, timing."""
    from align.cache.read import manifest_of  # loads torch: not for --help
    from align.cache.store import resolve_cache

    path = resolve_cache(_root(root), key)
    _print_info(path, manifest_of(path))


@user_errors
def verify_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
                   root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP)) -> None:
    """Re-hash every file and check headers, shapes, dtypes, counts, finiteness and indices (what loads check)."""
    from align.cache.read import check_cache  # loads torch: not for --help
    from align.cache.store import resolve_cache

    path = resolve_cache(_root(root), key)
    check_cache(path, rehash=True)  # a damaged cache: one line naming the folder and the problem, exit 2
    console.print(f"ok: {path.name} matches its manifest", highlight=False)


@user_errors
def rm_command(key: str = typer.Argument(..., help="Cache key (or a unique prefix)."),
               root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP)) -> None:
    """Delete one cache folder (only a real cache: a manifest, or an embed in progress)."""
    from align.cache.store import remove_cache  # loads torch: not for --help

    console.print(f"removed {remove_cache(_root(root), key)}", highlight=False)


def _register_import(group: typer.Typer) -> None:
    """Add `align cache import`."""

    @group.command("import")
    @user_errors
    def import_command(
        source: Optional[Path] = typer.Argument(None, help="A clip-retrieval output folder: img_emb/img_emb_N.npy, "
                                                "text_emb/text_emb_N.npy, metadata/metadata_N.parquet if any."),
        name: str = typer.Option(..., "--name", help="The cache's name: its folder is NAME-SPLIT-DIGEST under the "
                                 "root, and a config names it as data.caches.SPLIT: NAME."),
        image: Optional[Path] = typer.Option(None, "--image", help="Image embeddings, .npy (rows × dims, float16 "
                                             "or float32), instead of SOURCE."),
        text: Optional[Path] = typer.Option(None, "--text", help="Text embeddings, .npy, with --image."),
        pairs: Optional[Path] = typer.Option(None, "--pairs", help="Each text row's image row, .npy of integers "
                                             "(default: row i of each is one pair)."),
        image_encoder: str = typer.Option(..., "--image-encoder", help="Name of the model that made the image "
                                          "embeddings (recorded, part of the key)."),
        text_encoder: str = typer.Option(..., "--text-encoder", help="Name of the model that made the text "
                                         "embeddings (recorded, part of the key)."),
        split: str = typer.Option("train", "--split", help="The split it is (train, val, test, ...): recorded, "
                                  "part of the key and folder."),
        root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Make a verified cache from embeddings computed elsewhere (streamed: memory stays bounded)."""
        from align.cache.importing import import_cache, open_source  # loads torch: not for --help

        found = open_source(source, image, text, pairs)
        path, written = import_cache(found, name, split, {"image": image_encoder, "text": text_encoder},
                                     _root(root), progress=progress, log=lambda m: console.print(m, highlight=False))
        if written:
            console.print(f"use it with data: {{caches: {{{split}: {name}}}}} (cache_root: {path.parent})",
                          highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `align cache` command group."""
    group = typer.Typer(help="List, inspect, verify, remove and import cached embeddings.", no_args_is_help=True)
    app.add_typer(group, name="cache")
    for name, command in (("ls", ls_command), ("info", info_command), ("verify", verify_command),
                          ("rm", rm_command)):
        group.command(name)(command)
    _register_import(group)

"""`align embed --config FILE|NAME [--set k=v ...] [--split S ...] [--strict]`: encode a dataset into the cache.

Under `torchrun --nproc-per-node N --no-python align embed ...` the N ranks share the shards of each split."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from align.cli.common import console, joined, rank_log, user_errors
from align.common.config_files import resolve_config

# what each rank still alive says when a rank of a torchrun job dies
RESUME = "finished shards are kept: run the same command again to resume"

def register(app: typer.Typer) -> None:
    """Add `align embed`."""

    @app.command("embed")
    @user_errors
    def embed_command(
        config: str = typer.Option(..., "--config", "-c", metavar="FILE|NAME",
                                   help="An embed config (a path, or a name from `align configs`: embed/, then "
                                        "train/ and compare/), or any config with a `data:` section."),
        overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value: key.sub=value "
                                                      "(paths as in the file, e.g. data.batch_size=32)."),
        splits: Optional[list[str]] = typer.Option(None, "--split", help="Embed only this split (repeatable)."),
        strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping it."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Encode images and captions once with frozen encoders; resumable, cached under cache_root/<key>/."""
        from align.cache.key import load_embed_config  # loads torch: not for --help
        from align.cache.read import read_manifest
        from align.cache.write import embed_split

        cfg = load_embed_config(resolve_config(config, ("embed", "train", "compare")), overrides)
        if strict:
            cfg.strict = True
        todo = list(splits) if splits else cfg.splits
        with joined(cfg.device, RESUME) as me:  # under torchrun the ranks share the shards; rank 0 reports
            paths = {split: embed_split(cfg, split, progress=progress and me.is_main, log=rank_log(me))
                     for split in todo}
        if not me.is_main:
            return
        table = Table(title=f"embedding cache under {cfg.cache_root}", title_justify="left", header_style="bold")
        for column in ("split", "key", "images", "captions", "skipped", "dims i/t"):
            table.add_column(column, justify="right" if column in ("images", "captions", "skipped") else "left",
                             overflow="fold")
        for split, path in paths.items():
            manifest = read_manifest(path) or {}
            counts, dims = manifest.get("counts", {}), manifest.get("dims", {})
            table.add_row(split, path.name, str(counts.get("images")), str(counts.get("captions")),
                          str(counts.get("skipped_images")), f"{dims.get('image')} / {dims.get('text')}")
        console.print(table)

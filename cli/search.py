"""`align search RUN --text "a red circle" --images FOLDER | --cache KEY [-k 5] [--gallery PNG]`: the top-k images
for a caption through a trained run's heads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from align.cli.common import console, user_errors


def register(app: typer.Typer) -> None:
    """Add `align search`."""

    @app.command("search")
    @user_errors
    def search_command(
        run_dir: Path = typer.Argument(..., help="A run directory written by align train."),
        text: list[str] = typer.Option(..., "--text", "-t", help="A caption to search with (repeat for several)."),
        images: Optional[Path] = typer.Option(None, "--images", metavar="FOLDER", help="Search the image files of "
                                              "this folder (embedded now by the run's encoders)."),
        cache: Optional[str] = typer.Option(None, "--cache", metavar="KEY", help="Search a cache made by the run's "
                                            "encoders (cache key or folder)."),
        cache_root: Optional[Path] = typer.Option(None, "--cache-root", help="Where cache keys live (default: "
                                                  "$ALIGN_HOME/cache, else data/cache)."),
        k: int = typer.Option(5, "-k", "--top", help="How many images to show per caption."),
        gallery: Optional[Path] = typer.Option(None, "--gallery", metavar="PNG", help="Also draw them: one row per "
                                               "caption, its top-k images with their scores."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | mps (default: the run's)."),
    ) -> None:
        """Rank images by a caption through a trained run's heads (cosine of the head features), best first."""
        from align.cache.store import find_cache  # loads torch: not for --help
        from align.eval.search import search

        folder = None if cache is None else find_cache(cache, cache_root)
        rows = search(run_dir, text, images=images, cache=folder, k=k, gallery=gallery, device=device)
        for row in rows:
            table = Table(title=row["text"], header_style="bold", title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("image")
            for hit in row["hits"]:
                table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", hit["image"])
            console.print(table)
        if gallery is not None:
            console.print(f"wrote {gallery}", highlight=False)

"""`align eval RUN_DIR [--split test] [--checkpoint best|last] [--gallery PNG]` and `align eval --cache KEY_OR_PATH`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from align.cli.common import console, err_console, user_errors
from align.common.errors import AlignError
from align.common.files import require_writable, write_json


def print_eval(result: dict[str, Any]) -> None:
    """One evaluation result as a rich table, then its notes."""
    what = f"{result['source']}" + (f" ({result['checkpoint']}, step {result['step']})" if result.get("checkpoint") else "")
    console.print(f"[bold]{what}[/] — split {result.get('split')}: {result['num_images']} images, "
                  f"{result['num_captions']} captions", highlight=False)
    table = Table(header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, "—" if value is None else f"{value:.4f}")
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"note: {note}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `align eval`."""

    @app.command("eval")
    @user_errors
    def eval_command(
        run_dir: Optional[Path] = typer.Argument(None, help="A run directory written by align train."),
        split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (run: default test; cache: the key's own split)."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best | last"),
        cache: Optional[str] = typer.Option(None, "--cache", help="Evaluate raw cached embeddings (cache key or folder), no head; with RUN_DIR: the run's heads on that cache (same encoders)."),
        cache_root: Optional[Path] = typer.Option(None, "--cache-root", help="Where cache keys live (default: $ALIGN_HOME/cache, else data/cache)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | mps (run: default the run's)."),
        backend: Optional[str] = typer.Option(None, "--backend", help="k-NN search: faiss | torch."),
        knn_k: int = typer.Option(8, "--knn-k", help="k of mutual-k-NN and CKNNA (raw embeddings)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the results JSON here (--cache on a labelled split: the zero-shot confusion matrix too, as OUT-confusion.png)."),
        gallery: Optional[Path] = typer.Option(None, "--gallery", metavar="PNG", help="Write a retrieval gallery: for 4 caption queries, the top-5 images with their scores."),
    ) -> None:
        """Retrieval recall (both ways), alignment metrics and, on a labelled split (mnist), zero-shot accuracy of a
        trained head (confusion matrix PNG under RUN/eval/), or of raw embeddings (--cache)."""
        from align.cache.store import find_cache  # loads torch: not for --help
        from align.eval.evaluate import evaluate_cache, evaluate_run

        if run_dir is None and cache is None:
            raise AlignError("give either a RUN_DIR or --cache KEY_OR_PATH (both: the run's heads on that cache)")
        if backend is not None and backend not in ("faiss", "torch"):
            raise AlignError(f"unknown --backend {backend!r}: use faiss or torch")
        if out is not None:  # before the work, not after it (the library checks the figures' paths)
            require_writable(out, "--out file", "give another --out", file=True)
        say = lambda m: err_console.print(m, highlight=False)  # noqa: E731
        folder = None if cache is None else find_cache(cache, cache_root)
        if run_dir is not None:
            if checkpoint not in ("best", "last"):
                raise AlignError(f"unknown --checkpoint {checkpoint!r}: use best or last")
            result = evaluate_run(run_dir, split=split or "test", checkpoint=checkpoint, device=device,
                                  backend=backend, log=say, gallery=gallery, cache=folder)
        else:
            confusion = None if out is None else out.with_name(f"{out.stem}-confusion.png")
            result = evaluate_cache(folder, split=split, knn_k=knn_k, backend=backend or "faiss", gallery=gallery,
                                    confusion=confusion, log=say)
        if out is not None:  # before printing: a failed write is then the only output
            write_json(out, result)
        print_eval(result)
        if out is not None:
            console.print(f"wrote {out}", highlight=False)

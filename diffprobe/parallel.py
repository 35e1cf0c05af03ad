"""Process-parallel map with a progress bar (rich, which ships with typer)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        transient=transient,
    )


def parallel_map(
    fn: Callable[..., T],
    items: Sequence[Any],
    num_processes: int,
    description: str,
    show_progress: bool = True,
    extra_args: Iterable[Any] = (),
) -> list[T]:
    """``[fn(item, *extra_args) for item in items]`` over ``num_processes`` workers, in order.

    Each worker holds one case at a time, so peak RAM is about one case per worker.
    """
    extra = tuple(extra_args)
    results: list[Any] = [None] * len(items)
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(items), visible=show_progress)
        if num_processes <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item, *extra)
                progress.advance(task)
            return results
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=num_processes, mp_context=ctx) as pool:
            futures = {pool.submit(fn, item, *extra): i for i, item in enumerate(items)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                progress.advance(task)
    return results

"""``distill shards inspect`` and ``distill shards export``: what a shard directory (or
a stage directory of per-domain shard directories) holds, and the rows as JSONL or
Parquet for tools outside the pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from distill.messages import json_values
from distill.shards import MANIFEST, ShardError, read_manifest, read_shard, read_table, shard_files

FORMATS = ("jsonl", "parquet")


def shard_dirs(path: str | Path, below: bool = False) -> dict[str, Path]:
    """``{name: directory}`` of the shard directories at ``path``: itself, or its
    subdirectories holding a manifest (``raw/<domain>/``), named by their path under
    ``path``. ``below``: at any depth (``data/demo`` finds ``raw/*/`` and ``clean/*/``)."""
    p = Path(path)
    if not p.exists():
        raise ShardError(f"{p}: no such file or directory")
    if (p / MANIFEST).exists():
        return {p.name: p}
    manifests = (p.rglob(MANIFEST) if below else p.glob(f"*/{MANIFEST}")) if p.is_dir() else []
    found = {m.parent.relative_to(p).as_posix(): m.parent for m in sorted(manifests)}
    if not found:
        where = "here or below" if below else "here or in its subdirectories"
        raise ShardError(f"{p}: no {MANIFEST} {where} (not a finished shard directory)")
    return found


def unfinished_dirs(path: str | Path, below: bool = False) -> list[Path]:
    """Directories at ``path`` (or anywhere below) holding shards or journals but no
    manifest: a stage cut short, or a manifest deleted. Never silently left out."""
    p = Path(path)
    if not p.is_dir() or (p / MANIFEST).exists():
        return []
    dirs = [p, *(p.rglob("*") if below else p.iterdir())]
    return [
        d
        for d in sorted(dirs)
        if d.is_dir()
        and not (d / MANIFEST).exists()
        and any(f.suffix == ".arrow" or f.name.startswith("_journal-") for f in d.iterdir())
    ]


def summarize(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Counts per shard directory: rows, shards, bytes, rows per domain, verdicts."""
    out: dict[str, Any] = {"dirs": {}, "schema": None}
    for name, d in shard_dirs(path, below=True).items():
        manifest = read_manifest(d)
        table = read_table(d, verify=verify)
        verdict = table.column("verdict") if "verdict" in table.column_names else None
        passed = pc.struct_field(verdict, "passed") if verdict is not None else None
        out["dirs"][name] = {
            "path": str(d),
            "rows": table.num_rows,
            "shards": len(manifest["shards"]),
            "bytes": manifest["bytes"],
            "fingerprint": manifest.get("fingerprint"),
            "domains": _counts(table, "domain"),
            "passed": int(pc.sum(pc.equal(passed, True)).as_py() or 0) if passed is not None else 0,
            "failed": int(pc.sum(pc.equal(passed, False)).as_py() or 0)
            if passed is not None
            else 0,
            "unverified": int(passed.null_count) if passed is not None else table.num_rows,
        }
        out["schema"] = out["schema"] or table.schema
    return out


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names:
        return {}
    vc = pc.value_counts(table.column(column)).to_pylist()
    return {str(x["values"]): x["counts"] for x in vc}


def print_inspect(
    path: str | Path, rows: int = 2, verify: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Print a summary table, the schema and ``rows`` rendered rows per directory."""
    console = console or Console()
    summary = summarize(path, verify)
    for d in unfinished_dirs(path, below=True):  # shown, not hidden: its rows are not here
        console.print(f"[yellow]warning:[/] {d}: shards without a {MANIFEST} (not finished)")
    t = Table(title=f"shards in {path}")
    for col in ("dir", "rows", "shards", "MB", "domains", "passed", "failed", "unverified"):
        t.add_column(col, justify="left" if col in ("dir", "domains") else "right")
    for name, s in summary["dirs"].items():
        doms = ", ".join(f"{k}={v}" for k, v in s["domains"].items())
        t.add_row(
            name,
            str(s["rows"]),
            str(s["shards"]),
            f"{s['bytes'] / 1e6:.2f}",
            doms,
            str(s["passed"]),
            str(s["failed"]),
            str(s["unverified"]),
        )
    console.print(t)
    schema = "\n".join(f"{f.name}: {f.type}" for f in summary["schema"])
    console.print(Panel(Text(schema), title="schema"))
    for name, d in shard_dirs(path, below=True).items():
        table = read_table(d)
        for row in table.slice(0, rows).to_pylist():
            console.print(render_row(row, title=f"{name} · {row.get('id')}"))
    return summary


def render_row(row: dict[str, Any], title: str, width: int = 400) -> Panel:
    """One trace as a rich panel: header fields, then each message (long text cut)."""

    def cut(s: str | None) -> str:
        s = s or ""
        return s if len(s) <= width else s[:width] + f" … (+{len(s) - width} chars)"

    verdict = row.get("verdict")
    head = f"task {row.get('task_id')} · domain {row.get('domain')} · split {row.get('split')} · teacher {row.get('teacher')}"
    head += (
        f" · verdict {'pass' if verdict['passed'] else 'fail'} ({verdict['reason']})"
        if verdict
        else " · unverified"
    )
    parts: list[Any] = [Text(head, style="dim")]
    for m in row.get("messages") or []:
        parts.append(Text(f"[{m['role']}]", style="bold cyan"))
        if m.get("reasoning_content"):
            parts.append(Text(cut(m["reasoning_content"]), style="italic dim"))
        if m.get("content"):
            parts.append(Text(cut(m["content"])))
        for c in m.get("tool_calls") or []:
            fn = c["function"]
            parts.append(Text(f"→ {fn['name']}({cut(fn['arguments'])})", style="magenta"))
    return Panel(Group(*parts), title=title, title_align="left")


def export(path: str | Path, fmt: str, out: str | Path) -> int:
    """Write every row under ``path`` to ``out`` as JSONL or Parquet; returns rows."""
    if fmt not in FORMATS:
        raise ShardError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if unfinished := unfinished_dirs(path):
        raise ShardError(
            f"{unfinished[0]}: shards without a {MANIFEST} (its stage did not finish, or the "
            "manifest was deleted); rerun that stage, or export the other directories one by one"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [f for d in shard_dirs(path).values() for f in shard_files(d)]
    tmp = out.with_name(out.name + ".tmp")
    try:
        n = _write(files, fmt, out, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed export leaves nothing behind
        raise
    os.replace(tmp, out)
    return n


def _write(files: list[Path], fmt: str, out: Path, tmp: Path) -> int:
    from distill.progress import track

    n = 0
    if fmt == "parquet":
        writer = None
        for f in track(files, f"export {out.name}", unit="shards"):
            table = read_shard(f)
            writer = writer or pq.ParquetWriter(str(tmp), table.schema)
            writer.write_table(table)
            n += table.num_rows
        if writer is None:
            from distill.messages import TRACE_SCHEMA

            writer = pq.ParquetWriter(str(tmp), TRACE_SCHEMA)
        writer.close()
    else:
        with open(tmp, "w") as fh:
            for f in track(files, f"export {out.name}", unit="shards"):
                for batch in read_shard(f).to_batches():
                    for row in batch.to_pylist():
                        row.update(json_values(row))  # tools and reference as JSON, not text
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                        n += 1
    return n

"""Rendering a results document: a text report for the terminal, Markdown for the README."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from bench import stats

__all__ = ["render_markdown", "render_text"]


def _machine_line(m: Mapping[str, Any]) -> str:
    kvm = m.get("kvm") or {}
    mem = m.get("memory_bytes")
    mem_s = f", {mem / 2**30:.0f} GiB" if mem else ""
    return (
        f"{m.get('cpu_model')}, {m.get('cpus_online')} CPUs{mem_s}; {m.get('kernel')};"
        f" {kvm.get('kind')}; load {m.get('load_average_start')} -> {m.get('load_average_end')}"
    )


def _goal_lines(fig: Mapping[str, Any]) -> List[str]:
    out = []
    for g in fig.get("goals", []):
        mark = "MET " if g.get("met") else "MISS"
        measured = g.get("measured")
        if isinstance(measured, float):
            measured = f"{measured:.3g}"
        out.append(f"  [{mark}] {g['goal']}: {measured}")
    return out


def render_text(doc: Mapping[str, Any]) -> str:
    """The whole run as aligned tables, one per figure, with the goals under each."""
    lines = [
        f"serrinj benchmarks ({doc.get('started')}, {doc.get('duration_s')} s)",
        f"machine: {_machine_line(doc.get('machine', {}))}",
        *doc.get("warnings", []),
        "",
    ]
    for fig in doc.get("figures", {}).values():
        lines.append(fig["title"])
        table = fig.get("table")
        if table:
            lines.append(stats.text_table(table["headers"], table["rows"]))
        for extra in fig.get("extra_tables", []):
            lines.append(extra["title"])
            lines.append(stats.text_table(extra["headers"], extra["rows"]))
        lines += _goal_lines(fig)
        for note in fig.get("notes", []):
            lines.append(f"  note: {note}")
        lines.append("")
    for name, err in doc.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(doc: Mapping[str, Any]) -> str:
    """Every figure's table and goals as Markdown (for the README's ``make bench`` section)."""
    parts = [f"Measured {doc.get('started')} on {_machine_line(doc.get('machine', {}))}.", ""]
    for fig in doc.get("figures", {}).values():
        parts.append(f"**{fig['title']}**")
        parts.append("")
        table = fig.get("table")
        if table:
            parts.append(stats.markdown_table(table["headers"], table["rows"]))
            parts.append("")
        for extra in fig.get("extra_tables", []):
            parts.append(f"_{extra['title']}_")
            parts.append("")
            parts.append(stats.markdown_table(extra["headers"], extra["rows"]))
            parts.append("")
        goals: List[Dict[str, Any]] = fig.get("goals", [])
        for g in goals:
            measured = g.get("measured")
            if isinstance(measured, float):
                measured = f"{measured:.3g}"
            parts.append(f"- {'met' if g.get('met') else '**missed**'}: {g['goal']} ({measured})")
        if goals:
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"

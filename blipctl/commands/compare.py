"""The recipe step that ends the demo: one table comparing pre-trainings (e.g. A on raw web vs B on CapFilt data)."""

from __future__ import annotations

import json
from pathlib import Path

from blip.atomic import write_json
from blip.errors import InputError
from blipctl._common import out as console

METRICS = [  # (row, results kind, key, display scale: recall is already in percent, caption scores x 100)
    ("TR@1", "retrieval", "txt_r1", 1.0),
    ("IR@1", "retrieval", "img_r1", 1.0),
    ("R@mean", "retrieval", "r_mean", 1.0),
    ("BLEU-4", "caption", "Bleu_4", 100.0),
    ("CIDEr", "caption", "CIDEr", 100.0),
]


def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"compare: results file not found: {p}")
    return json.loads(p.read_text())


def run_compare(
    out: str,
    retrieval: dict[str, str] | None = None,
    caption: dict[str, str] | None = None,
    capfilt: str | None = None,
) -> dict:
    """Tabulate models side by side (`retrieval`/`caption`: {label: results JSON}) plus the filter's quality."""
    from rich.table import Table

    retrieval, caption = retrieval or {}, caption or {}
    labels = list(dict.fromkeys([*retrieval, *caption]))
    if not labels:
        raise InputError("compare: give at least one retrieval or caption results file")
    res = {
        "retrieval": {k: _read(v) for k, v in retrieval.items()},
        "caption": {k: _read(v) for k, v in caption.items()},
    }
    rows: dict[str, dict[str, float | None]] = {}
    for name, kind, key, _ in METRICS:
        rows[name] = {}
        for lab in labels:
            v = res[kind].get(lab, {})
            v = v.get("metrics", v).get(key) if isinstance(v, dict) else None
            rows[name][lab] = v
    table = Table("metric", *labels, title="blipctl: pre-training comparison (recall %, caption scores x 100)")
    for name, *_, scale in METRICS:
        vals = rows[name]
        if all(v is None for v in vals.values()):
            continue
        best = max((v for v in vals.values() if v is not None), default=None)
        cells = []
        for lab in labels:
            v = vals[lab]
            text = "-" if v is None else f"{v * scale:.2f}"
            cells.append(f"[bold]{text}[/]" if v is not None and v == best and len(labels) > 1 else text)
        table.add_row(name, *cells)
    result: dict = {"metrics": rows}
    if capfilt:
        s = _read(capfilt)
        f = s.get("filter_vs_noise_labels")
        if f:
            result["filter"] = f
            table.caption = (
                f"filter vs known noise: noisy web captions removed {f['noisy_removed']:.1%}, "
                f"clean kept {f['clean_kept']:.1%} (precision {f['precision']:.3f}, "
                f"recall {f['recall']:.3f})"
            )
        synthetic = s.get("captions_vs_scene", {}).get("synthetic")
        if synthetic:
            result["synthetic_vs_scene"] = synthetic
            kept = synthetic.get("kept", {"share": 0.0, "checked": 0})
            line = (
                f"synthetic captions naming the scene right: {synthetic['all']['share']:.1%} of all, "
                f"{kept['share']:.1%} of the {kept['checked']} kept"
            )
            if kept.get("phrases"):  # the issue-15 target is per "[size] colour shape [position]" phrase
                line += f" ({kept['phrases_right_share']:.1%} of their {kept['phrases']} phrases)"
            table.caption = f"{table.caption}; {line}" if table.caption else line
    console.print(table)
    write_json(out, result, ensure_ascii=False)
    return result

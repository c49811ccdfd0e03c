"""The "GPU" table of ``docs/performance.md`` from the JSON ``bench/gpu_suite.sh`` writes.

    python -m bench.gpu_table docs/bench/gpu --doc docs/performance.md

Reads ``train_step_sd15.json`` (``bench/train_step.py``) and ``families_sdxl.json`` (``bench/families.py``)
from the folder, writes ``table.md`` beside them and, with ``--doc``, replaces the text between the
``<!-- gpu-table -->`` markers of that page (added at its end if it has none).  Every cell is a ratio
measured side by side in one process, or a peak measured on the device (``max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- gpu-table:begin -->", "<!-- gpu-table:end -->"


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(folder: Path) -> str:
    """Markdown rows of every measurement the folder holds, each naming the JSON it came from."""
    rows = ["| architecture (random weights) | measurement | value | from |", "|---|---|---|---|"]
    sd = folder / "train_step_sd15.json"
    if sd.is_file():
        r = json.loads(sd.read_text())["sd15"]
        shape = f"SD 1.5, {r['shapes']['image'][0]} px, batch {r['shapes']['batch']}, base {r['config']['base_dtype']}"
        mem = r["peak_mem_bytes"]
        for label, value in [
                ("MCM step / base forward", f"{r['mcm_step_over_base_forward']:.2f}"),
                ("ControlNet step / MCM step", f"{r['controlnet_step_over_mcm_step']:.2f}"),
                ("full fine-tuning step / base forward", f"{r['finetune_step_over_base_forward']:.2f}"),
                ("base-free MCM step (cached predictions) / base forward",
                 f"{r['mcm_step_from_cached_predictions_over_base_forward']:.2f}"),
                ("peak memory: base inference / MCM step / ControlNet step",
                 f"{_gib(mem['base_inference'])} / {_gib(mem['mcm_step'])} / {_gib(mem['controlnet_step'])}"),
                ("base forward (median)", f"{1000 * r['time_s']['base_forward']:.1f} ms")]:
            rows.append(f"| {shape} | {label} | {value} | `{sd.name}` |")
    xl = folder / "families_sdxl.json"
    if xl.is_file():
        r = json.loads(xl.read_text())["sdxl"]
        shape = f"SDXL, {8 * r['shapes']['latent'][1]} px, batch 1, base bfloat16"
        cells = [("MCM step / base forward", f"{r['mcm_step_over_base_forward']:.2f}"),
                 ("peak memory: MCM step / base inference", f"{r['mcm_peak_mem_over_base_inference']:.2f}")]
        cells.append(("ControlNet step / MCM step", f"{r['controlnet_step_over_mcm_step']:.2f}")
                     if "controlnet_step_over_mcm_step" in r else
                     ("ControlNet step", r.get("controlnet_skipped", "not measured")))
        rows += [f"| {shape} | {label} | {value} | `{xl.name}` |" for label, value in cells]
    devices = [json.loads(xl.read_text())["sdxl"].get("device")] if xl.is_file() else []
    devices += [json.loads(sd.read_text())["sd15"]["config"].get("device")] if sd.is_file() else []
    device = next((d for d in devices if d), None)
    head = f"Device: {device}." if device else ""
    return "\n".join([head, "", *rows]).strip() + "\n"


def write_doc(doc: Path, text: str, command: str) -> None:
    page = doc.read_text()
    block = f"{BEGIN}\n{text}\nMade by `{command}`.\n{END}"
    if BEGIN in page and END in page:
        page = page[:page.index(BEGIN)] + block + page[page.index(END) + len(END):]
    else:
        page = page.rstrip() + "\n\n## GPU\n\n" + block + "\n"
    doc.write_text(page)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="the folder bench/gpu_suite.sh wrote")
    p.add_argument("--doc", default=None, help="page whose GPU table to replace (docs/performance.md)")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    text = table(folder)
    (folder / "table.md").write_text(text)
    if a.doc:
        write_doc(Path(a.doc), text, "bash bench/gpu_suite.sh")
    print(text)
    return text


if __name__ == "__main__":
    main()

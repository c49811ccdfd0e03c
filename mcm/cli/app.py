"""``mcm app``: draw a map, pick the modules and strengths, see the base and base + MCM side by side in the browser.

    pip install -e ".[app]"
    mcm app                                   # the shipped shapes32 pipeline on http://127.0.0.1:7860
    mcm app --modules runs/a/export runs/b/export --weights 1 1 --port 7861    # compose two modules
    mcm app --base path/to/base --modules path/to/export --data "data/shapes/val-*.tar"

One canvas per modality of the loaded modules, in the plugin's own colours (label maps: a brush per
class; sketches: strokes; depth: grey levels from near to far, or an uploaded 8/16-bit map), "load a
held-out example" (the ``--data`` shards, else the shapes generator's ``test`` split), and the
sampler's controls.  Results: the conditions, the base alone and base + modules for the same seeds,
the judges' alignment per sample on ``shapes32``, a zip of the images and the Python call that
reproduces them.  Serves on 127.0.0.1 and fetches nothing (``--share`` opens a public Gradio tunnel:
only on request).  The Gradio-independent logic lives in :mod:`mcm.cli.app_maps` and
:mod:`mcm.cli.app_session`.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from datamodules.devices import resolve_device

log = logging.getLogger(__name__)

#: environment that keeps Gradio and the Hugging Face libraries offline (set before they are imported)
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "GRADIO_SSR_MODE": "False"}
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: middle;
          margin: 0 0.25em 0 0.6em; }
"""


def _legend(spec) -> str:
    if not spec.legend:
        return "upload a map file (as the shards store it)"
    return "".join(f'<span class="swatch" style="background:{c}"></span>{n}' for n, c in spec.legend)


def build_app(session, title: str = "MCM: control a frozen diffusion model"):
    """The Gradio page over a :class:`~mcm.cli.app_session.Session`."""
    import gradio as gr
    import numpy as np

    from mcm.cli import app_maps as M
    from mcm.cli import app_session as S

    size = session.size
    scale = max(1, 256 // max(size))
    canvas_hw = (size[0] * scale, size[1] * scale)
    plugins = session.plugins
    specs = {n: M.canvas_spec(n, p) for n, p in plugins.items()}
    names = list(specs)
    held_out = M.HeldOut(plugins, size, session.data)
    workdir = Path(tempfile.mkdtemp(prefix="mcm_app_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    log.info("mcm app: this session's files in %s (removed on exit)", workdir)

    def editor_value(img: np.ndarray) -> dict:
        return {"background": img, "layers": [], "composite": img}

    with gr.Blocks(title="mcm app", analytics_enabled=False) as demo:
        mods = ", ".join(f"{n} [{', '.join(m.modality_names)}]" for n, m in zip(session.module_names, session.modules))
        gr.Markdown(f"## {title}\nBase **{session.base_name}** ({size[1]}x{size[0]}"
                    f"{', text-conditional' if session.is_text_conditional else ''}) · modules: {mods}. "
                    "Draw or upload a map per modality, or load a held-out example (every ticked condition that is not "
                    "empty is used), then press **Generate**. Everything runs on this machine.")
        editors, uploads = {}, {}
        with gr.Row():
            for n in names:
                spec = specs[n]
                with gr.Column(min_width=220):
                    gr.HTML(f"<b>{n}</b><br><small>{_legend(spec)}</small>")
                    if spec.kind != "upload":
                        # label maps: the first class (not the background), 3 output pixels wide; sketch strokes
                        # 1 output pixel wide (as the edges it was trained on); other continuous maps 3 wide
                        first = 1 if spec.kind == "labels" and len(spec.brush_colors) > 1 else 0
                        brush = gr.Brush(colors=spec.brush_colors, color_mode="fixed",
                                         default_color=spec.brush_colors[first],
                                         default_size=max(2, scale * (1 if spec.binary else 3)))
                        editors[n] = gr.ImageEditor(
                            value=editor_value(M.blank_canvas(spec, size, scale)), image_mode="RGBA", type="numpy",
                            sources=(), transforms=(), layers=False, brush=brush, eraser=gr.Eraser(scale * 2),
                            canvas_size=(canvas_hw[1], canvas_hw[0]), fixed_canvas=True, format="png",
                            show_label=False, height=canvas_hw[0] + 110, elem_id=f"canvas-{n}",
                            elem_classes=["pixelated"])
                    uploads[n] = gr.File(label=f"or upload a {n} map (PNG)", file_types=["image"],
                                         elem_id=f"upload-{n}", height=60)
        with gr.Row(equal_height=True):
            used = gr.CheckboxGroup(names, value=list(names), label="conditions to use (an empty canvas is not used)",
                                    elem_id="used", scale=3)
            example_idx = gr.Number(0, precision=0, label="held-out example #", minimum=0, scale=1)
            load_btn = gr.Button("Load a held-out example", elem_id="load-example", scale=1)
            clear_btn = gr.Button("Clear the maps", scale=1)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", visible=session.is_text_conditional, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt (with guidance > 1)",
                                      visible=session.is_text_conditional)
                class_label = gr.Number(None, precision=0, label="class label", visible=session.is_class_conditional)
                with gr.Accordion("region brush: the modules act only where painted", open=False):
                    region = gr.ImageEditor(
                        value=editor_value(np.zeros((*canvas_hw, 3), np.uint8)), image_mode="RGBA", type="numpy",
                        sources=(), transforms=(), layers=False, format="png", show_label=False,
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=scale * 3),
                        eraser=gr.Eraser(scale * 3), canvas_size=(canvas_hw[1], canvas_hw[0]), fixed_canvas=True,
                        height=canvas_hw[0] + 110, elem_id="region")
                    gr.Markdown("Painted pixels get the module's conditioning scale, the rest 0 (a scale map); "
                                "leave it black for the scale everywhere.")
            with gr.Column():
                module_box = gr.CheckboxGroup([(n, i) for i, n in enumerate(session.module_names)],
                                              value=list(range(len(session.modules))), label="modules to use",
                                              type="value")
                strengths = [gr.Slider(0.0, 3.0, value=float(m.default_strength), step=0.05,
                                       label=f"conditioning scale: {n} (module default {m.default_strength:g})")
                             for n, m in zip(session.module_names, session.modules)]
                with gr.Row():
                    # the noise levels t/T where the modules act (control_guidance_start = 1 - high, end = 1 - low)
                    lo = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="control acts from noise level t/T")
                    hi = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="up to t/T (1 = pure noise)")
            with gr.Column():
                with gr.Row():
                    steps = gr.Slider(1, 100, value=25, step=1, label="steps")
                    guidance = gr.Slider(1.0, 10.0, value=1.0, step=0.5, label="guidance scale")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="seed (image i: seed + i)")
                    num = gr.Slider(1, 8, value=4, step=1, label="number of images")
                scheduler = gr.Dropdown(list(S.SCHEDULERS), value=session.default_scheduler_label,
                                        label="scheduler")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        gallery = dict(columns=8, fit_columns=False, height=205, object_fit="contain", elem_classes=["pixelated"],
                       format="png", allow_preview=False)
        judged = " (captions: the judge's alignment with the first condition)" if session.judged else ""
        cond_gallery = gr.Gallery(label="conditions (as the modules see them)", elem_id="conditions", **gallery)
        base_gallery = gr.Gallery(label=f"base alone{judged}", elem_id="base-images", **gallery)
        mcm_gallery = gr.Gallery(label=f"base + modules, same seeds{judged}", elem_id="mcm-images", **gallery)
        scores = gr.Dataframe(label="alignment per sample (shapes32 judges; base alone = chance level)",
                              visible=session.judged, elem_id="scores", interactive=False)
        with gr.Row():
            files = gr.File(label="downloads", file_count="multiple", elem_id="downloads", interactive=False)
            code = gr.Code(label="the Python call that reproduces these images", language="python", elem_id="code")
        with gr.Accordion("model", open=False):
            base_box = gr.Textbox(session.base_name, label="base (the modules are checked against it)")
            base_btn = gr.Button("Load this base")

        editor_list, upload_list = [editors[n] for n in editors], [uploads[n] for n in names]
        example_maps = gr.State({})  # a held-out example's maps of modalities that have no canvas (upload only)

        # ---- events -----------------------------------------------------------------------------------
        def load_example(idx):
            try:
                maps, caption, _ = held_out(int(idx or 0))
            except Exception as e:
                raise gr.Error(_message(e)) from None
            out = [editor_value(M.raw_to_canvas(specs[n], maps[n], scale)) for n in editors]
            out += [None] * len(names)
            rest = {n: maps[n] for n in names if n not in editors}
            return [*out, list(names), caption, int(idx or 0) + 1, rest]

        load_btn.click(load_example, example_idx,
                       [*editor_list, *upload_list, used, prompt, example_idx, example_maps])

        def clear():
            blank = [editor_value(M.blank_canvas(specs[n], size, scale)) for n in editors]
            return [*blank, *([None] * len(names)), {}]

        clear_btn.click(clear, None, [*editor_list, *upload_list, example_maps])

        inputs = dict(canvases=editors, files=uploads, used=used, region=region, prompt=prompt, negative=negative,
                      class_label=class_label, modules=module_box, strengths=strengths, lo=lo, hi=hi, steps=steps,
                      guidance=guidance, seed=seed, num=num, scheduler=scheduler, example=example_maps)

        def run(data: dict):
            # gradio passes a set of inputs as one {component: value} dict: read it back by name, not by position
            v = {k: ({n: data[c] for n, c in comp.items()} if isinstance(comp, dict) else
                     [data[c] for c in comp] if isinstance(comp, list) else data[comp])
                 for k, comp in inputs.items()}
            t0 = time.time()
            try:
                maps, notes, empty = gather_maps(specs, size, v["used"], v["canvases"], v["files"], v["example"])
                req = make_request(session, maps, v, size)
                result = session.generate(req)
                paths = S.save_result(result, tempfile.mkdtemp(dir=workdir))
            except Exception as e:
                log.warning("mcm app: generation failed: %s", e, exc_info=not isinstance(e, ValueError))
                raise gr.Error(_message(e), duration=None) from None
            return result_views(result, req, paths, notes, empty, time.time() - t0)

        all_inputs = {c for comp in inputs.values()
                      for c in (comp.values() if isinstance(comp, dict) else comp if isinstance(comp, list) else [comp])}
        generate_btn.click(run, all_inputs, [cond_gallery, base_gallery, mcm_gallery, scores, status, files, code],
                           concurrency_limit=1, show_progress="minimal")

        def switch(base):
            try:
                name = session.switch_base(base)
            except Exception as e:
                raise gr.Error(_message(e), duration=None) from None
            gr.Info(f"loaded base '{name}'")
            return name

        base_btn.click(switch, base_box, base_box, concurrency_limit=1)
    return demo


def gather_maps(specs: dict, size: tuple[int, int], used: list[str] | None, canvases: dict, files: dict,
                example: dict | None) -> tuple[dict, list[str], list[str]]:
    """The raw map of every ticked condition: an uploaded file first, else a drawn canvas, else a loaded held-out
    example's map; returns ``(maps, notes, empty)`` (``empty``: ticked but nothing there)."""
    from mcm.cli import app_maps as M

    notes, maps, empty = [], {}, []
    for n in used or []:
        comp = canvases.get(n)
        comp = comp.get("composite") if isinstance(comp, dict) else comp
        if files.get(n):
            maps[n], note = M.read_map_file(specs[n], files[n], size)
            notes += [note] if note else []
        elif n in canvases and not M.is_blank(specs[n], comp):
            maps[n] = M.canvas_to_raw(specs[n], comp, size)
        elif n in (example or {}):
            maps[n] = example[n]
        else:
            empty.append(n)
    if not maps:
        raise M.AppError("conditions: nothing to condition on; draw on a canvas, upload a map or load a "
                         "held-out example, and tick its condition")
    return maps, notes, empty


def make_request(session, maps: dict, v: dict, size: tuple[int, int]):
    """The page's values (by name) -> the session's :class:`~mcm.cli.app_session.Request`."""
    from mcm.cli import app_maps as M
    from mcm.cli import app_session as S

    comp = v["region"].get("composite") if isinstance(v["region"], dict) else v["region"]
    cls = v["class_label"]
    return S.Request(maps=maps, modules=sorted(int(i) for i in (v["modules"] or [])),
                     strengths=[float(s) for s in v["strengths"]], region=M.region_mask(comp, size),
                     prompt=v["prompt"] or "", negative_prompt=v["negative"] or "", num_images=int(v["num"]),
                     steps=int(v["steps"]), guidance_scale=float(v["guidance"]),
                     window=(float(v["lo"]), float(v["hi"])), seed=int(v["seed"] or 0), scheduler=v["scheduler"],
                     class_label=int(cls) if session.is_class_conditional and cls is not None else None)


def result_views(result, req, paths: dict, notes: list[str], empty: list[str], seconds: float) -> tuple:
    """What the page shows of a run: the three galleries (captions with the judges' scores), the table, the
    status line, the downloads and the reproducing code."""
    import torch

    from mcm.cli import app_session as S

    cond_imgs = [(im, n) for im, n in zip(S.upscale(torch.cat(list(result.conditions.values()))), result.conditions)]
    captions = {r["sample"]: r for r in result.scores}

    def caption(i, row):
        r = captions.get(i, {})
        key = next((k for k in r if k.endswith(f"({row})")), None)
        if not key or r[key] is None:
            return f"seed {req.seeds[i]}"
        return f"seed {req.seeds[i]} · {key.split(' (')[0].split()[-1]} {r[key]:.2f}"

    base_imgs = [(im, caption(i, "base")) for i, im in enumerate(S.upscale(result.base))]
    mcm_imgs = [(im, caption(i, "MCM")) for i, im in enumerate(S.upscale(result.mcm))]
    region_note = " · region brush on" if req.region is not None else ""
    n_img = req.num_images
    made = f"{n_img} controlled images (the base alone reused: same sampler settings)" \
        if result.base_reused else f"{n_img} base + {n_img} controlled images"
    msg = (f"{made} in {result.seconds:.2f} s ({req.steps} {req.scheduler} steps, conditions: "
           f"{', '.join(req.maps)}{region_note}; page round trip {seconds:.2f} s)")
    if empty:
        notes = notes + [f"not used (empty canvas): {', '.join(empty)}"]
    if notes:
        msg += "\n\n" + "\n\n".join(f"⚠ {x}" for x in notes)
    downloads = [str(paths[k]) for k in ("mcm_app_run.zip", "mcm_images.png", "base_images.png", "reproduce.py",
                                          "conditions.npz")]
    return cond_imgs, base_imgs, mcm_imgs, _table(result.scores), msg, downloads, result.code


def _message(e: BaseException) -> str:
    """What the page says about an error: the message itself for input errors, the type too otherwise."""
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {text}"


def _table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows) if rows else pd.DataFrame()


def serve(a: argparse.Namespace) -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    import torch

    from mcm.cli.app_session import Session

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    session = Session(a.model or ["shapes32"], a.base, a.weights, a.device, a.data)
    session.warm_up()
    import gradio as gr

    demo = build_app(session)
    # SIGTERM (a service manager, `kill`) would end the process without running atexit, leaving the session's
    # files behind: treat it as Ctrl-C, which Gradio's launch loop answers by closing the server and returning
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log.info("mcm app: %s + %d module(s) ready in %.1f s", session.base_name, len(session.modules), time.time() - t0)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=a.host, server_port=a.port, share=a.share, inbrowser=False, show_error=True, ssr_mode=False,
        pwa=False, mcp_server=False, quiet=False, css=CSS, theme=gr.themes.Default(), footer_links=["settings"])


def _run(a: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        log.error("mcm app needs Gradio: pip install -e \".[app]\" (or pip install 'mcm-diffusion[app]')")
        return 2
    try:
        serve(a)
    except (ValueError, FileNotFoundError) as e:  # bad --modules / --base / --data: a message, not a traceback
        log.error("mcm app: %s", e)
        return 2
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("app", help="the browser app: draw a map, see base and base + MCM side by side (extra [app])",
                       description="Draw a map, pick the modules and strengths, see the base and base + MCM side "
                                   "by side in the browser (Gradio, served on 127.0.0.1, nothing fetched).")
    p.add_argument("--modules", "--model", "--mcm", dest="model", nargs="+", default=None,
                   help="exported MCM/ControlNet dirs or built-in names (default: shapes32; several: composed)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="composition weight per --model")
    p.add_argument("--base", default=None, help="base model (default: the one the first --model names)")
    p.add_argument("--data", default=None, help="held-out shards for 'load a held-out example' "
                   "(default: the shapes generator's test split)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (contacts gradio.app)")
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_run)

"""The package layout (docs/architecture.md): imports run one way, models <- diffusion <- pipelines <-
training / evaluation <- cli; inference never imports Lightning; adapters are never told apart
by type in the sampler."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mcm"
LAYER = {"models": 0, "diffusion": 1, "pipelines": 2, "training": 3, "evaluation": 3, "cli": 4}


def mcm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, 'mcm.sub...') of every import of an mcm module in ``path`` (function-level ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("mcm"):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:  # resolve a relative import against the file
            package = ["mcm", *path.relative_to(ROOT).parts[:-1]]
            base = package[: len(package) - (node.level - 1)]
            out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mcm")]
    return out


def test_imports_run_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        sub = path.relative_to(ROOT).parts[0]
        if sub not in LAYER:
            continue
        for line, mod in mcm_imports(path):
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else None
            if target is None or target not in LAYER or target == sub:
                continue  # `from mcm import X` is only used for lazy top-level names; same package is fine
            if LAYER[target] >= LAYER[sub]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({sub}) imports {mod} ({target})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


#: the whole tree, lowest first: a package imports only from itself and the ones before it
TREE = ("modalities", "datamodules", "mcm")


def top_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
    return out


def test_the_whole_tree_imports_one_way():
    """``modalities`` <- ``datamodules`` <- ``mcm``: the data never imports the model code (the encoding job and
    the prediction cache, which run the base, live in ``mcm.training``), hidden function-level imports included."""
    repo = ROOT.parent
    bad = []
    for i, package in enumerate(TREE):
        above = set(TREE[i + 1:])
        for path in sorted((repo / package).rglob("*.py")):
            bad += [f"{path.relative_to(repo)}:{line} imports {mod}" for line, mod in top_level_imports(path)
                    if mod in above]
    assert not bad, "imports against the package order modalities <- datamodules <- mcm:\n" + "\n".join(bad)


@pytest.mark.parametrize("statement", ["import mcm.pipelines", "from mcm import MCMPipeline",
                                       "import mcm.diffusion.control, mcm.models.t2i_adapter"])
def test_inference_does_not_import_lightning(statement):
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{statement!r} imported {out}"


def test_sampler_and_composition_never_test_an_adapter_type():
    for rel in ("diffusion/control.py", "diffusion/sampling.py", "pipelines/pipeline.py"):
        src = (ROOT / rel).read_text()
        for needle in ("is_controlnet", "isinstance(c.adapter", "ControlNetAdapter", "T2IAdapterControl"):
            assert needle not in src, f"mcm/{rel} tests adapter types ({needle})"

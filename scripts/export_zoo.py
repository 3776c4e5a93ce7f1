#!/usr/bin/env python3
"""Export a bundle as a MONAI Model Zoo submission folder and run the Zoo's checks on it.

    python scripts/export_zoo.py BUNDLE OUT [--weights model.pt] [--weights-url URL] [--code vendor|package]

``BUNDLE`` is a folder in ``bundles/`` (or a path), ``OUT`` the new folder (``models/<bundle_name>`` of a model-zoo
checkout, say). ``OUT`` is never overwritten unless ``--overwrite``; the source bundle is only read.

OUT receives the bundle's ``configs/``, ``docs/``, ``LICENSE`` (and ``scripts/``), ``models/model.pt`` (from
``--weights`` or the bundle's own ``models/model.pt``; a plain state dict) and ``large_files.yml`` declaring
``models/model.pt`` with its hash and download URL (a placeholder that does not resolve unless ``--weights-url``).
Upload ``models/model.pt`` to that URL and keep it out of the pull request (files over 25 MB cannot be committed).

Network code (``--code``):

* ``vendor`` (default): the modules of ``shared_networks`` the configs need are copied to ``OUT/scripts/
  shared_networks`` (the Zoo's convention for custom code; MONAI Label isolates bundles by unloading the top-level
  package ``scripts``), every ``shared_networks`` reference in the configs becomes ``scripts.shared_networks``, and
  ``required_packages_version`` lists the vendored code's third-party imports instead of ``shared-networks``.
* ``package``: the configs are copied unchanged and keep ``shared-networks`` pinned in ``required_packages_version``;
  the Zoo CI then pip-installs it, so the pinned version must be on PyPI.

Then the Zoo's checks run on OUT, each in a fresh process whose working directory is a temporary folder (vendor
mode: with ``PYTHONPATH=OUT`` as the Zoo CI and MONAI Label put the bundle root on the path, and the installed
``shared_networks`` made unimportable so that only the vendored copy can serve): required files, version in the
changelog, the large_files.yml hash, ``verify_metadata`` against the shipped schema copy (a temporary path, not left
in OUT), ``verify_net_in_out``, and ``ckpt_export`` (TorchScript) -- or, for a network ``torch.jit.script`` cannot
compile, the export the bundle declares in ``metadata.json`` ``export_formats`` (``shared_networks.bundle.export``),
in which case docs/README.md must say that TorchScript scripting is not supported (the Zoo then lists the bundle in
``exclude_verify_torchscript_list``). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO, "bundles")
PACKAGE = "shared_networks"
DIST = "shared-networks"
META_SCHEMA = os.path.join(REPO, PACKAGE, "bundle", "meta_schema_20240725.json")
PLACEHOLDER_URL = "https://REPLACE-ME.invalid/{name}_v{version}/model.pt"
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # what monai.apps.utils.check_hash / download_url accept
SKIP_DIRS = {"models", "eval", "runs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
SKIP_FILES = {"large_files.yml", "large_files.yaml", "large_files.json"}
#: pinned by metadata's own monai_version / pytorch_version / numpy_version fields, not required_packages_version
BASE_DISTS = {"torch", "monai", "numpy"}
#: import name -> distribution name where they differ (the rest are looked up in the installed environment)
DIST_NAMES = {"ignite": "pytorch-ignite", "PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml",
              "sklearn": "scikit-learn", "cv2": "opencv-python"}


class ExportError(Exception):
    """A problem with the inputs; the message says what was wrong and what was expected."""


def log(msg: str) -> None:
    print(f"[export_zoo] {msg}", flush=True)


def file_hash(path: str, hash_type: str = "md5") -> str:
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_bundle(bundle: str) -> str:
    path = bundle if os.path.isdir(bundle) else os.path.join(BUNDLES_DIR, bundle)
    if not os.path.isfile(os.path.join(path, "configs", "metadata.json")):
        avail = sorted(os.listdir(BUNDLES_DIR)) if os.path.isdir(BUNDLES_DIR) else []
        raise ExportError(f"{bundle!r} is not a bundle (no configs/metadata.json); bundles in {BUNDLES_DIR}: {avail}")
    return os.path.abspath(path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=4)  # the Zoo's pre-commit pretty-formats JSON with 4 spaces
        f.write("\n")


# -------------------------------------------------------------------------------------------------- weights
def read_state_dict(path: str):
    """The weights as a plain state dict (``{"model": sd}`` is unwrapped); tensors only, weights-only load."""
    import torch

    if not os.path.isfile(path):
        raise ExportError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path} is not a weights-only PyTorch state dict ({type(e).__name__}: {e})") from e
    nested = isinstance(ckpt, dict) and set(ckpt) == {"model"} and isinstance(ckpt["model"], dict)
    sd = ckpt["model"] if nested else ckpt
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ExportError(
            f"{path} must hold a state dict (parameter name -> tensor) or {{'model': state_dict}}, as the bundle's "
            "training writes; MONAI Label and the Zoo load it with torch.load(weights_only=True)."
        )
    return sd, nested


def large_files_yml(path: str, url: str, hash_val: str, hash_type: str, placeholder: bool, name: str) -> str:
    lines = [
        f"# Weights of {name}. Upload models/model.pt to the url below and keep the file itself out of the pull",
        "# request; `python -m monai.bundle download_large_files --bundle_path .` fetches and checks it.",
    ]
    if placeholder:
        lines.append("# REPLACE the placeholder url below (it does not resolve) with the public download link.")
    lines += [
        "large_files:",
        f'  - path: "{path}"',
        f'    url: "{url}"',
        f'    hash_val: "{hash_val}"',
        f'    hash_type: "{hash_type}"',
    ]
    return "\n".join(lines) + "\n"


def parse_large_files_yml(text: str) -> list[dict]:
    """The ``large_files`` list of a large_files.yml (PyYAML when installed, else the flat form written here)."""
    try:
        import yaml

        return list((yaml.safe_load(text) or {}).get("large_files", []))
    except ImportError:
        items: list[dict] = []
        for line in text.splitlines():
            m = re.match(r'^\s*(-\s+)?(\w+):\s*"?([^"]*)"?\s*$', line)
            if not m or m.group(2) == "large_files":
                continue
            if m.group(1):
                items.append({})
            items[-1][m.group(2)] = m.group(3)
        return items


# ---------------------------------------------------------------------------------------------- vendoring
_REF = re.compile(r"(?<![\w.])" + PACKAGE + r"(?![\w])")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _rewrite(obj, fn):
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _rewrite(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite(v, fn) for v in obj]
    return obj


def config_references(configs_dir: str) -> list[str]:
    """Dotted ``shared_networks...`` names used in the bundle's configs (``_target_`` and expressions)."""
    refs = set()
    for f in sorted(os.listdir(configs_dir)):
        path = os.path.join(configs_dir, f)
        if f.endswith(".json"):
            strings = list(_strings(read_json(path)))
        elif f.endswith((".yaml", ".yml")):
            strings = [open(path).read()]
        else:
            continue
        for s in strings:
            refs.update(m.group(0) for m in re.finditer(r"(?<![\w.])" + PACKAGE + r"(\.\w+)*", s))
    return sorted(refs)


_FIND_MODULES = r'''
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    parts = name.split(".")
    obj = None
    for i in range(len(parts), 0, -1):  # longest importable prefix, then attributes (lazy name maps resolve here)
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        break
    if obj is None:
        raise SystemExit("cannot import %s" % name)
mods = {m: getattr(sys.modules[m], "__file__", None) for m in list(sys.modules)
        if m == "''' + PACKAGE + r'''" or m.startswith("''' + PACKAGE + r'''.")}
print("MODULES " + json.dumps(mods))
'''


def _module_file(pkg_root: str, module: str) -> str | None:
    rel = module.split(".")[1:]
    base = os.path.join(pkg_root, *rel)
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.join(base, "__init__.py")
    if os.path.isfile(base + ".py"):
        return base + ".py"
    return None


def _imports_of(path: str, module: str, is_pkg: bool):
    """(package-internal modules, third-party top-level names) imported anywhere in ``path``; imports inside a
    ``try`` that catches ImportError (optional accelerators) are not counted as requirements."""
    tree = ast.parse(open(path).read(), path)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is None or "Error" in ast.unparse(h.type) or "Exception" in ast.unparse(h.type)
            for h in node.handlers
        ):
            for sub in node.body:
                guarded.update(id(n) for n in ast.walk(sub))
    package = module if is_pkg else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    if a.asname is None:
                        raise ExportError(f"{path}: 'import {a.name}' cannot be vendored; use 'from ... import'.")
                    internal.add(a.name)
                elif id(node) not in guarded:
                    external.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == PACKAGE:
                internal.add(target)
                internal.update(f"{target}.{a.name}" for a in node.names)  # submodules imported by name
            elif id(node) not in guarded and not node.level:
                external.add(target.split(".")[0])
    return internal, external


def vendor_modules(bundle: str, python: str) -> tuple[dict[str, str], set[str]]:
    """Modules of shared_networks the bundle needs: those the configs' references import (found by importing them
    in a clean process, which resolves the lazy name maps), closed over every import statement in them (also the
    ones inside functions). Returns ({module: file}, third-party import names)."""
    refs = config_references(os.path.join(bundle, "configs"))
    meta = read_json(os.path.join(bundle, "configs", "metadata.json"))
    if meta.get("export_formats"):
        refs.append(f"{PACKAGE}.bundle.export")
    if not refs:
        return {}, set()
    r = subprocess.run([python, "-c", _FIND_MODULES, json.dumps(refs)], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MODULES ")), None)
    if r.returncode != 0 or line is None:
        raise ExportError(f"could not import the configs' {PACKAGE} references {refs}:\n{r.stderr[-2000:]}")
    found = {m: f for m, f in json.loads(line[8:]).items() if f}
    pkg_root = os.path.dirname(found[PACKAGE])
    todo, modules, external = list(found), {}, set()
    while todo:
        m = todo.pop()
        if m in modules:
            continue
        path = _module_file(pkg_root, m)
        if path is None:  # an attribute imported by name, not a module
            continue
        modules[m] = path
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        internal, ext = _imports_of(path, m, path.endswith("__init__.py"))
        todo.extend(internal)
        external |= ext
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return modules, {e for e in external if e not in stdlib and e != PACKAGE}


def _bind_scripts(cfg):
    """MONAI binds ``$import a.b`` under the name ``"a.b"``, not ``a`` (ConfigExpression._parse_import_string), so
    ``$import shared_networks`` made ``shared_networks`` usable in expressions but ``$import scripts.shared_networks``
    does not bind ``scripts``: add ``$import scripts`` in front of the first such import."""
    imports = cfg.get("imports") if isinstance(cfg, dict) else None
    if isinstance(imports, list) and "$import scripts" not in imports:
        at = next((i for i, x in enumerate(imports) if isinstance(x, str) and re.match(r"^\$\s*import\s+scripts\.", x)),
                  None)
        if at is not None:
            imports.insert(at, "$import scripts")
    return cfg


def _rewrite_source(src: str) -> str:
    out = re.sub(r"^(\s*)from " + PACKAGE + r"(?=[.\s])", r"\1from scripts." + PACKAGE, src, flags=re.M)
    out = re.sub(r"^(\s*)import " + PACKAGE + r"(\.[\w.]+)?(\s+as\s)", r"\1import scripts." + PACKAGE + r"\2\3",
                 out, flags=re.M)
    return out


def distribution_pins(names: set[str], current: dict) -> dict:
    """``{distribution: version}`` for third-party import names: versions already pinned in the bundle's metadata
    win, else the installed version."""
    from importlib import metadata as md

    by_module = md.packages_distributions()
    pins = {}
    for name in sorted(names):
        dists = [DIST_NAMES[name]] if name in DIST_NAMES else by_module.get(name, [])
        if not dists:
            raise ExportError(f"vendored code imports {name!r}, which is not installed here; cannot pin it.")
        dist = dists[0]
        if dist.lower() in BASE_DISTS or dist.lower() == DIST:
            continue
        pinned = next((v for k, v in current.items() if k.lower() == dist.lower()), None)
        pins[dist] = pinned or md.version(dist)
    return pins


# ------------------------------------------------------------------------------------------------- export
def _check_out(bundle: str, out: str, overwrite: bool) -> None:
    b, o = os.path.realpath(bundle), os.path.realpath(out)
    if o == b or o.startswith(b + os.sep) or b.startswith(o + os.sep):
        raise ExportError(f"OUT {out} must lie outside the source bundle {bundle} (and not contain it).")
    if os.path.lexists(out):
        if not overwrite:
            raise ExportError(f"{out} already exists; choose a new folder or pass --overwrite to replace it.")
        if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, "configs",
                                                                                            "metadata.json"))):
            raise ExportError(f"--overwrite refuses to delete {out}: it is not a bundle folder (no configs/"
                              "metadata.json). Remove it yourself if it is really meant to go.")


def export_bundle(
    bundle: str,
    out: str,
    weights: str | None = None,
    weights_url: str | None = None,
    hash_type: str = "md5",
    code: str = "vendor",
    overwrite: bool = False,
    python: str = sys.executable,
) -> dict:
    """Write the Zoo folder ``out`` for ``bundle``; returns a summary dict. See the module docstring."""
    bundle = resolve_bundle(bundle)
    out = os.path.abspath(out)
    if hash_type not in HASH_TYPES:
        raise ExportError(f"--hash-type must be one of {HASH_TYPES}, got {hash_type!r}.")
    if code not in ("vendor", "package"):
        raise ExportError(f"--code must be 'vendor' or 'package', got {code!r}.")
    _check_out(bundle, out, overwrite)  # before any slow step: a refusal is immediate
    weights = os.path.abspath(weights) if weights else os.path.join(bundle, "models", "model.pt")
    if not os.path.isfile(weights):
        raise ExportError(
            f"no weights: {weights} does not exist. The Zoo requires models/model.pt; train the bundle "
            "(configs/train.json writes it), import official weights, or pass --weights PATH."
        )
    sd, nested = read_state_dict(weights)
    meta = read_json(os.path.join(bundle, "configs", "metadata.json"))
    name, version = os.path.basename(bundle), str(meta.get("version", "0.0.0"))
    if code == "vendor" and os.path.exists(os.path.join(bundle, "scripts", PACKAGE)):
        raise ExportError(f"{bundle}/scripts/{PACKAGE} exists already; cannot vendor the package there.")
    modules, external = vendor_modules(bundle, python) if code == "vendor" else ({}, set())

    # built in a private staging folder next to OUT, moved into place only when complete
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".export_zoo_", dir=os.path.dirname(out))
    tmp_out = os.path.join(stage, name)
    try:
        # 1. the bundle's own files (configs, docs, LICENSE, scripts, ...), never its outputs
        shutil.copytree(bundle, tmp_out, ignore=lambda d, names: [
            n for n in names if (d == bundle and n in SKIP_DIRS | SKIP_FILES) or n in SKIP_DIRS - {"models"}
            or n.endswith(".pyc")])
        # 2. weights: copied byte for byte when already a plain state dict (the hash is then the user's file's)
        dst = os.path.join(tmp_out, "models", "model.pt")
        os.makedirs(os.path.dirname(dst))
        if nested:
            import torch

            torch.save(sd, dst)
        else:
            shutil.copyfile(weights, dst)
        hash_val = file_hash(dst, hash_type)
        url = weights_url or PLACEHOLDER_URL.format(name=name, version=version)
        with open(os.path.join(tmp_out, "large_files.yml"), "w") as f:
            f.write(large_files_yml("models/model.pt", url, hash_val, hash_type, weights_url is None, name))
        # 3. network code
        pins = dict(meta.get("required_packages_version", {}))
        if code == "vendor":
            pkg_root = os.path.dirname(modules[PACKAGE])
            scripts = os.path.join(tmp_out, "scripts")
            os.makedirs(scripts, exist_ok=True)
            init = os.path.join(scripts, "__init__.py")
            if not os.path.exists(init):
                with open(init, "w") as f:
                    f.write(f'"""Custom code of this bundle. ``{PACKAGE}``: vendored subset of {DIST} '
                            f'{_installed_version()} made by scripts/export_zoo.py."""\n')
            for m, src_path in sorted(modules.items()):
                rel = os.path.relpath(src_path, pkg_root)
                dst_path = os.path.join(scripts, PACKAGE, rel)
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
                with open(src_path) as f:
                    text = f.read()
                with open(dst_path, "w") as f:
                    f.write(_rewrite_source(text))
            for d, _, files in os.walk(os.path.join(scripts, PACKAGE)):  # every vendored folder is a package
                if "__init__.py" not in files:
                    open(os.path.join(d, "__init__.py"), "w").close()
            configs = os.path.join(tmp_out, "configs")
            for f in os.listdir(configs):
                p = os.path.join(configs, f)
                if f == "metadata.json":  # prose, not config: only its package pins change (below)
                    continue
                if f.endswith(".json"):
                    write_json(p, _bind_scripts(_rewrite(read_json(p), lambda s: _REF.sub("scripts." + PACKAGE, s))))
                elif f.endswith((".yaml", ".yml")):
                    with open(p) as fh:
                        text = fh.read()
                    with open(p, "w") as fh:
                        fh.write(_REF.sub("scripts." + PACKAGE, text))
            meta_out = read_json(os.path.join(configs, "metadata.json"))
            pins = {k: v for k, v in pins.items() if k.lower() != DIST}
            for dist, ver in distribution_pins(external, pins).items():
                pins.setdefault(dist, ver)
            meta_out["required_packages_version"] = pins
            write_json(os.path.join(configs, "metadata.json"), meta_out)
        if os.path.lexists(out):  # --overwrite, checked by _check_out; replaced only once the new folder is complete
            shutil.rmtree(out)
        os.rename(tmp_out, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"out": out, "bundle": bundle, "code": code, "hash_type": hash_type, "hash_val": hash_val, "url": url,
            "placeholder_url": weights_url is None, "vendored": sorted(modules), "required_packages_version": pins,
            "weights_unwrapped": nested, "n_tensors": len(sd)}


def _installed_version() -> str:
    from importlib import metadata as md

    try:
        return md.version(DIST)
    except md.PackageNotFoundError:
        return "(not installed)"


# -------------------------------------------------------------------------------------------------- checks
#: Runs in ONE fresh process (working directory: a temporary folder), calling the monai.bundle functions the Zoo's
#: ci/verify_bundle.py calls, in its order. Vendor mode first makes the installed shared_networks unimportable.
_CHECKER = r"""
import importlib.abc, json, os, sys, time, traceback
spec = json.loads(sys.argv[1])
if spec["block"]:
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "shared_networks" or name.startswith("shared_networks."):
                raise ImportError("shared_networks is blocked: a vendored bundle may use scripts.shared_networks only")
    sys.meta_path.insert(0, _Block())
    sys.path.insert(0, spec["out"])  # the bundle root, as the Zoo CI and MONAI Label add it

def row(check, fn):
    t0 = time.time()
    try:
        detail = fn() or ""
        ok = True
    except Exception:
        ok, detail = False, traceback.format_exc().strip()[-2500:]
    print("ROW " + json.dumps([check, ok, ("%.0f s" % (time.time() - t0)) + ("; " + detail if detail else "")]),
          flush=True)
    return ok

out, ov = spec["out"], spec["overrides"]
meta_file = os.path.join(out, "configs", "metadata.json")
config_file = os.path.join(out, "configs", "inference.json")
ckpt = os.path.join(out, "models", "model.pt")
from monai.apps.utils import check_hash
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

def _references():
    # every _target_, "$import" and dotted name of the project's package in every config resolves (vendor mode:
    # from the vendored copy only, the installed package being blocked)
    import pydoc, re
    from monai.bundle import ConfigParser
    from monai.bundle.config_item import ComponentLocator
    import ast
    locator, n = ComponentLocator(), 0
    files = [f for f in sorted(os.listdir(os.path.join(out, "configs"))) if f.endswith((".json", ".yaml", ".yml"))]
    cfgs = {f: ConfigParser.load_config_file(os.path.join(out, "configs", f)) for f in files}
    # names the configs' "$import ..." entries bind, as MONAI binds them: "import a.b" binds "a.b", not "a"
    bound = set()
    for cfg in cfgs.values():
        for x in (cfg.get("imports") or []) if isinstance(cfg, dict) else []:
            node = ast.parse(x[1:].strip()).body[0] if isinstance(x, str) and x.startswith("$") else None
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.add(node.names[0].asname or node.names[0].name)
    for f, cfg in cfgs.items():
        stack = [cfg]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                t = node.get("_target_")
                if isinstance(t, str) and not t.startswith(("$", "@", "%")):
                    found = pydoc.locate(t) if "." in t else locator.get_component_module_name(t)
                    if not found:
                        raise ImportError("%s: _target_ %r does not resolve" % (f, t))
                    n += 1
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str) and node.startswith("$"):
                if re.match(r"^\$\s*(import|from)\s", node):
                    exec(node[1:], {})
                    n += 1
                for ref in re.findall(r"(?<![\w.])(?:scripts\.)?shared_networks(?:\.\w+)+", node):
                    if pydoc.locate(ref) is None:
                        raise ImportError("%s: %r does not resolve" % (f, ref))
                    root = ref.split(".")[0]
                    if not re.match(r"^\$\s*(import|from)\s", node) and root not in bound:
                        raise NameError("%s: %r uses the name %r, which no '$import' of the configs binds (MONAI "
                                        "binds 'import a.b' as 'a.b'; add '$import %s')" % (f, node[:80], root, root))
                    n += 1
    return "%d references" % n
want = spec["steps"].__contains__
if want("references"):
    row("config _target_s and imports resolve", _references)

def _hash():
    if not check_hash(ckpt, spec["hash_val"], spec["hash_type"]):
        raise ValueError("models/model.pt does not match hash_val")
if want("hash"):
    row("large_files.yml %s hash == models/model.pt" % spec["hash_type"], _hash)
if want("metadata"):
    row("verify_metadata (schema 20240725)", lambda: verify_metadata(meta_file=meta_file, filepath=spec["schema"]))
if want("net_in_out"):
    row("verify_net_in_out", lambda: verify_net_in_out(
        net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=out, device="cpu", **ov))
ts = os.path.join(spec["tmp"], "verify_model.ts")
ok = not want("export") or row("ckpt_export (torch.jit.script)", lambda: ckpt_export(
    net_id="network_def", filepath=ts, ckpt_file=ckpt, meta_file=meta_file, config_file=config_file,
    bundle_root=out, **ov))
if not ok:
    import importlib
    for fmt in spec["export_formats"]:
        def _alt(fmt=fmt):
            mod = importlib.import_module(spec["export_module"])
            path = os.path.join(spec["tmp"], "alt_" + mod.FORMATS[fmt])
            mod.export_network(out, fmt, filepath=path, ckpt_file=ckpt, **ov)
            return "wrote and reloaded " + os.path.basename(path)
        row("declared alternative export '%s'" % fmt, _alt)
"""


def _summary(detail: str, ok: bool) -> str:
    """First line of a detail, or for a failure its last line (where a traceback names the error)."""
    lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
    return (lines[0] if ok or len(lines) < 2 else lines[0].split(";")[0] + "; " + lines[-1])[:200] if lines else ""


#: the steps of the checks process, in the Zoo CI's order
STEPS = ("references", "hash", "metadata", "net_in_out", "export")


def check_export(out: str, code: str | None = None, overrides: dict | None = None, python: str = sys.executable,
                 timeout: float = 1800, steps=STEPS) -> list[tuple[str, bool, str]]:
    """Run the Zoo's checks on ``out``; returns ``[(check, ok, detail)]``.

    File / metadata checks run here; ``verify_metadata``, ``verify_net_in_out``, ``ckpt_export`` (and the declared
    alternative export) run in one fresh process whose working directory is a temporary folder, like the Zoo CI.
    ``overrides`` (``{"network_def#feature_size": 8, ...}``) go to every step that builds the network: for fast
    tests only; a submission is checked as shipped. ``steps``: a subset of :data:`STEPS` (default all)."""
    out = os.path.abspath(out)
    overrides = dict(overrides or {})
    if code is None:
        code = "vendor" if os.path.isdir(os.path.join(out, "scripts", PACKAGE)) else "package"
    rows: list[tuple[str, bool, str]] = []

    def add(check, ok, detail=""):
        rows.append((check, bool(ok), detail))
        log(f"{'PASS' if ok else 'FAIL'} {check}" + (f" ({_summary(detail, ok)})" if detail else ""))
        return ok

    cfg, meta_file = os.path.join(out, "configs"), os.path.join(out, "configs", "metadata.json")
    required = ["LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt"]
    missing = [f for f in required if not os.path.isfile(os.path.join(out, f))]
    add("required files (LICENSE, metadata, inference config, models/model.pt)", not missing,
        f"missing: {missing}" if missing else "")
    if missing:
        return rows
    meta = read_json(meta_file)
    add("docs/README.md present", os.path.isfile(os.path.join(out, "docs", "README.md")), "")
    ver, changes = meta.get("version"), meta.get("changelog", {})
    add("version listed in changelog", ver is not None and ver in changes,
        f"version {ver}, changelog keys {list(changes)[:5]}")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if code == "vendor":
        stale = []
        for f in sorted(os.listdir(cfg)):
            if f.endswith((".json", ".yaml", ".yml")) and f != "metadata.json":
                with open(os.path.join(cfg, f)) as fh:
                    if _REF.search(re.sub(r"scripts\." + PACKAGE, "", fh.read())):
                        stale.append(f)
        add(f"configs reference only scripts.{PACKAGE}", not stale, f"still naming {PACKAGE}: {stale}" if stale else "")
        pins = meta.get("required_packages_version", {})
        add(f"{DIST} not required (vendored)", DIST not in {k.lower() for k in pins}, json.dumps(pins))
    else:
        pins = {k.lower(): v for k, v in meta.get("required_packages_version", {}).items()}
        inst = _installed_version()
        add(f"{DIST} pinned in required_packages_version", pins.get(DIST) == inst,
            f"pinned {pins.get(DIST)}, installed {inst}; the Zoo CI pip-installs it, so it must be on PyPI")
    large = os.path.join(out, "large_files.yml")
    items = parse_large_files_yml(open(large).read()) if os.path.isfile(large) else []
    item = next((i for i in items if i.get("path") == "models/model.pt"), None)
    if not add("large_files.yml declares models/model.pt", item is not None and item.get("url") and
               item.get("hash_type") in HASH_TYPES, json.dumps(items)[:300]):
        return rows
    if "REPLACE-ME.invalid" in str(item.get("url")):
        log("note: large_files.yml has the placeholder url; replace it before submitting")

    with tempfile.TemporaryDirectory(prefix="zoo_check_") as tmp:
        schema = os.path.join(tmp, "schema.json")
        shutil.copyfile(META_SCHEMA, schema)  # the shipped copy: no download, nothing left in OUT
        bad = [x for x in steps if x not in STEPS]
        if bad:
            raise ValueError(f"unknown check steps {bad}; choose from {STEPS}")
        spec = {"out": out, "tmp": tmp, "schema": schema, "overrides": overrides, "block": code == "vendor",
                "steps": list(steps),
                "hash_val": item.get("hash_val"), "hash_type": item.get("hash_type"),
                "export_formats": list(meta.get("export_formats") or []),
                "export_module": ("scripts." if code == "vendor" else "") + PACKAGE + ".bundle.export"}
        log(f"running the Zoo checks in a fresh process (cwd {tmp})")
        r = subprocess.run([python, "-c", _CHECKER, json.dumps(spec)], cwd=tmp, env=env, capture_output=True,
                           text=True, timeout=timeout)
        got = [json.loads(ln[4:]) for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
        if r.returncode != 0 or not got:
            add("Zoo checks process", False, f"exit {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}")
        by_name = {c: (ok, d) for c, ok, d in got}
        scripted = by_name.get("ckpt_export (torch.jit.script)", (False, ""))[0]
        alternatives = [(c, ok, d) for c, ok, d in got if c.startswith("declared alternative export")]
        for c, ok, d in got:
            if c == "ckpt_export (torch.jit.script)" and not ok:
                if alternatives:  # the Zoo lists such bundles in exclude_verify_torchscript_list
                    log(f"note: torch.jit.script cannot compile the network ({_summary(d, False)})")
                    continue
                d = "fails, and metadata.json declares no export_formats alternative; " + d
            if c.startswith("declared alternative export"):
                c = "TorchScript not scriptable; " + c
            add(c, ok, d)
        if not scripted and alternatives:
            readme = os.path.join(out, "docs", "README.md")
            said = os.path.isfile(readme) and "torchscript" in open(readme).read().lower()
            add("docs/README.md states the TorchScript limitation", said,
                "" if said else "the Zoo asks the README to say 'no TorchScript' for excluded bundles")
    leftovers = [p for p in ("eval", "models/verify_model.ts") if os.path.exists(os.path.join(out, p))]
    add("checks left nothing in OUT", not leftovers, f"found {leftovers}" if leftovers else "")
    return rows


def print_rows(rows) -> None:
    w = max(len(c) for c, _, _ in rows)
    print("\n" + "=" * (w + 40))
    for check, ok, detail in rows:
        lines = [ln for ln in (detail or "").splitlines() if ln.strip()]
        print(f"  {'PASS' if ok else 'FAIL'}  {check:<{w}}  {lines[0][:100] if lines else ''}")
        if not ok and len(lines) > 1:  # the end of an error says what went wrong
            for ln in lines[-4:]:
                print(f"  {'':4}  {'':<{w}}  | {ln[:160]}")
    print("=" * (w + 40))
    print("RESULT: " + ("PASS" if all(ok for _, ok, _ in rows) else "FAIL"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=textwrap.dedent(__doc__.split("\n\n", 2)[2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle name (folder in bundles/) or path")
    p.add_argument("out", help="new output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--weights", default=None, help="weights to ship (default: BUNDLE/models/model.pt)")
    p.add_argument("--weights-url", default=None, help="public download URL of models/model.pt for large_files.yml "
                                                        "(default: a placeholder to replace)")
    p.add_argument("--hash-type", default="md5", choices=HASH_TYPES, help="hash in large_files.yml (default md5)")
    p.add_argument("--code", default="vendor", choices=("vendor", "package"),
                   help="vendor shared_networks under scripts/ (default) or require the PyPI package")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT bundle folder")
    p.add_argument("--no-check", action="store_true", help="export only, skip the Zoo checks")
    p.add_argument("--check-only", action="store_true", help="only run the checks on an existing OUT")
    p.add_argument("--check-override", action="append", default=[], metavar="KEY=JSON",
                   help="override passed to the network-building checks (e.g. network_def#feature_size=8); for fast "
                        "tests only")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.check_override:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--check-override {item!r}: expected KEY=JSON")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    try:
        if not args.check_only:
            s = export_bundle(args.bundle, args.out, args.weights, args.weights_url, args.hash_type, args.code,
                              args.overwrite)
            log(f"wrote {s['out']} ({s['code']} mode; models/model.pt {s['hash_type']} {s['hash_val']})")
            if s["vendored"]:
                log(f"vendored {len(s['vendored'])} modules: " + ", ".join(m.split('.', 1)[-1] for m in s["vendored"]))
            log("required_packages_version: " + json.dumps(s["required_packages_version"]))
            if s["placeholder_url"]:
                log(f"large_files.yml url is a PLACEHOLDER ({s['url']}): upload models/model.pt and pass "
                    "--weights-url (or edit the file) before submitting")
        elif not os.path.isdir(args.out):
            raise ExportError(f"--check-only: {args.out} does not exist")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_check:
        return 0
    rows = check_export(args.out, None if args.check_only else args.code, overrides)
    print_rows(rows)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

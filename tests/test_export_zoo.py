"""scripts/export_zoo.py: the UNETR++ bundle exported as a Model Zoo folder passes the Zoo's checks from another cwd.

The full UNETR++ network (42.9 M parameters) needs ~20 s per 128x128x64 forward on a 2-core CPU, and the checks run
three or four forwards (verify_net_in_out, the traced export and its reload check), so the network-building checks
get ``--check-override`` with the narrower widths/depths of the bundle's configs/reduced.json (same 128x128x64
patch, so metadata's spatial_shape still applies). That override exists for this test; submissions are checked as
shipped. The exported configs themselves are not overridden.

The test exports a snapshot of the bundle (same folder name) so that edits to bundles/ made while it runs cannot
blur the "source unchanged" check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "export_zoo.py")
NAME = "unetr_pp_btcv_ct_segmentation"
BUNDLE = os.path.join(REPO, "bundles", NAME)
SMALL = {
    "network_def#feature_size": 8,
    "network_def#hidden_size": 128,
    "network_def#dims": [16, 32, 64, 128],
    "network_def#depths": [1, 1, 1, 1],
}
OVERRIDE_ARGS = [a for k, v in SMALL.items() for a in ("--check-override", f"{k}={json.dumps(v)}")]


def tree_digest(root: str) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (plus empty folders), to prove a tree unchanged."""
    out = {}
    for d, dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
        if not dirs and not files:
            out[os.path.relpath(d, root) + "/"] = "dir"
    return out


def run_export(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    src = str(tmp / "bundles" / NAME)
    shutil.copytree(BUNDLE, src, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(src, "configs", "inference.json"))
    parser.update(SMALL)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    weights = tmp / "initialised.pt"
    torch.save(net.state_dict(), weights)
    before = tree_digest(src)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    out = tmp / "model-zoo" / "models" / NAME
    r = run_export(src, out, "--weights", weights, *OVERRIDE_ARGS, cwd=elsewhere)
    return {"tmp": tmp, "src": src, "out": str(out), "weights": str(weights), "before": before, "result": r}


def test_export_passes_zoo_checks_from_another_cwd(exported):
    r = exported["result"]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "RESULT: PASS" in r.stdout
    for check in ("verify_metadata (schema 20240725)", "verify_net_in_out", "version listed in changelog",
                  "large_files.yml md5 hash == models/model.pt", "configs reference only scripts.shared_networks"):
        assert f"PASS  {check}" in r.stdout, check
    # UNETR++ cannot be torch.jit.script-ed: the bundle's declared alternative (traced TorchScript) must have run
    assert "declared alternative export 'torchscript_trace'" in r.stdout
    assert "FAIL" not in r.stdout


def test_folder_content(exported):
    out, src_dir = exported["out"], exported["src"]
    files = set(tree_digest(out))
    for f in ("LICENSE", "large_files.yml", "models/model.pt", "docs/README.md", "configs/metadata.json",
              "configs/inference.json", "configs/train.json", "configs/evaluate.json", "configs/logging.conf",
              "configs/multi_gpu_train.json", "scripts/__init__.py", "scripts/shared_networks/__init__.py",
              "scripts/shared_networks/nets/unetr_pp.py", "scripts/shared_networks/blocks/epa.py",
              "scripts/shared_networks/bundle/transforms.py"):
        assert f in files, f
    # only what the bundle needs is vendored; nothing the checks wrote is left behind
    assert not any("mamba" in f or "perspective" in f or "_numba" in f for f in files), sorted(files)
    assert not any(f.startswith(("eval/", "schema", "runs/")) or f.endswith((".ts", ".pt2", ".pyc")) for f in files)
    with open(os.path.join(out, "LICENSE"), "rb") as a, open(os.path.join(src_dir, "LICENSE"), "rb") as b:
        assert a.read() == b.read()
    # configs: every shared_networks reference now points at the vendored copy, nothing else changed
    for cfg in ("inference.json", "train.json", "evaluate.json"):
        with open(os.path.join(src_dir, "configs", cfg)) as f:
            src = f.read()
        with open(os.path.join(out, "configs", cfg)) as f:
            got = f.read()
        assert "scripts.shared_networks" in got
        expected = json.loads(src.replace("shared_networks", "scripts.shared_networks"))
        if "imports" in expected:  # MONAI binds "$import a.b" as the name "a.b": `scripts` needs its own import
            first = next(i for i, x in enumerate(expected["imports"]) if x.startswith("$import scripts."))
            expected["imports"].insert(first, "$import scripts")
        assert json.loads(got) == expected
    with open(os.path.join(out, "configs", "metadata.json")) as f:
        meta = json.load(f)
    with open(os.path.join(src_dir, "configs", "metadata.json")) as f:
        src_meta = json.load(f)
    pins = meta.pop("required_packages_version")
    assert "shared-networks" not in pins and pins["pytorch-ignite"] == src_meta["required_packages_version"][
        "pytorch-ignite"]
    src_meta.pop("required_packages_version")
    assert meta == src_meta
    # the vendored code imports itself as scripts.shared_networks (MONAI Label unloads the package `scripts`)
    for d, _, fs in os.walk(os.path.join(out, "scripts")):
        for f in fs:
            with open(os.path.join(d, f)) as fh:
                text = fh.read()
            assert not re.search(r"^\s*(from|import) shared_networks\b", text, re.M), f


def test_large_files_hash_is_the_weights(exported):
    out = exported["out"]
    with open(os.path.join(out, "large_files.yml")) as f:
        spec = yaml.safe_load(f)
    (item,) = spec["large_files"]
    assert item["path"] == "models/model.pt" and item["hash_type"] == "md5"
    with open(os.path.join(out, "models", "model.pt"), "rb") as f:
        shipped = f.read()
    with open(exported["weights"], "rb") as f:
        given = f.read()
    assert shipped == given  # a plain state dict is copied byte for byte
    assert item["hash_val"] == hashlib.md5(shipped).hexdigest()
    assert ".invalid/" in item["url"] and "REPLACE" in item["url"]  # placeholder that can never resolve


def test_source_bundle_unchanged(exported):
    assert tree_digest(exported["src"]) == exported["before"]


def test_refuses_to_overwrite(exported, tmp_path):
    out, src = exported["out"], exported["src"]
    before = tree_digest(out)
    r = run_export(src, out, "--weights", exported["weights"], "--no-check", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert tree_digest(out) == before
    # --overwrite still refuses a folder that is not a bundle
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "mine.txt").write_text("keep me")
    r = run_export(src, precious, "--weights", exported["weights"], "--overwrite", "--no-check", cwd=tmp_path)
    assert r.returncode == 2 and "not a bundle folder" in r.stderr
    assert (precious / "mine.txt").read_text() == "keep me"
    # inside the source bundle: refused
    r = run_export(src, os.path.join(src, "zoo"), "--weights", exported["weights"], "--no-check", cwd=tmp_path)
    assert r.returncode == 2 and "outside the source bundle" in r.stderr
    assert not os.path.exists(os.path.join(src, "zoo"))
    assert tree_digest(src) == exported["before"]


def test_package_mode_keeps_the_pinned_package(exported, tmp_path):
    out, src = tmp_path / "pkg", exported["src"]
    r = run_export(src, out, "--weights", exported["weights"], "--code", "package", "--no-check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (out / "scripts").exists()
    for cfg in ("inference.json", "train.json", "metadata.json"):
        with open(os.path.join(src, "configs", cfg)) as f:
            assert (out / "configs" / cfg).read_text() == f.read()
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["shared-networks"]


def test_bad_weights_are_refused(tmp_path):
    bad = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, bad)
    r = run_export(BUNDLE, tmp_path / "out", "--weights", bad, "--no-check", cwd=tmp_path)
    assert r.returncode == 2 and "state dict" in r.stderr and not (tmp_path / "out").exists()
    r = run_export(BUNDLE, tmp_path / "out", "--weights", tmp_path / "missing.pt", "--no-check", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_unbound_scripts_name_is_caught(exported, tmp_path):
    """``$scripts.shared_networks...`` expressions fail at run time unless an import binds ``scripts``; the
    references check (run in the clean, package-blocked process) must catch a config that lost that import."""
    spec = importlib.util.spec_from_file_location("export_zoo", SCRIPT)
    ez = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ez)
    broken = tmp_path / NAME
    shutil.copytree(exported["out"], broken)
    for cfg in ("inference.json", "train.json"):
        path = broken / "configs" / cfg
        data = json.loads(path.read_text())
        data["imports"].remove("$import scripts")
        path.write_text(json.dumps(data, indent=4))
    rows = {c: (ok, d) for c, ok, d in ez.check_export(str(broken), steps=("references",))}
    ok, detail = rows["config _target_s and imports resolve"]
    assert not ok and "NameError" in detail and "$import scripts" in detail

#!/usr/bin/env python3
"""Acceptance check: every bundle loads, infers and trains in MONAI Label 0.8.5 (offline, CPU).

    python3 scripts/monailabel_check.py --all                      # every folder in bundles/
    python3 scripts/monailabel_check.py unetr_pp_btcv_ct_segmentation [--venv PATH] [--workdir PATH]

MONAI Label pins numpy<2, so it runs in its OWN virtual environment (default ``.venv-monailabel`` in the repository,
about 3.7 GB, built on first use in 3-5 minutes and reused afterwards; install recipe: the project's MONAI Label
notes, ``torch==2.13.0`` first, then the MONAI Label stack with ``--no-build-isolation`` and ``SAM2_BUILD_CUDA=0``, a
guard in torchvision's ``_meta_registrations.py`` for the CUDA-only torchvision wheel, then this project editable).

Per bundle, in a throwaway work folder (``TMPDIR`` points there too):

1. a copy of the bundle with ``models/model.pt`` (the bundle's own if present, else the initialised network saved
   as a plain state dict), a copy of the stock ``monaibundle`` app with the bundle under ``model/<bundle>``, and a
   studies folder with two real images + labels (3D: ``data/demo/ct``; 2D: ``data/demo/nuclei`` converted to the
   file format of the bundle's configs);
2. the bundle's own ``python -m monai.bundle run`` inference on the first image (the reference);
3. the MONAI Label server (``--conf zoo_source ngc --conf sam2 false --conf preload false`` on 127.0.0.1; started
   without a shell so its PID is the server's, and stopped on every exit path);
4. ``GET /info/``: the model, its labels (``channel_def`` without background) and dimension;
   ``POST /infer``: the label equals the reference voxel for voxel, with the input's shape and affine; the server log
   has no "Checkpoint keys don't match" (silent random weights); the network MONAI Label builds carries exactly the
   tensors of ``models/model.pt``;
5. ``POST /train`` (1 epoch, val_split 0.5, CPU) runs to DONE and rewrites ``models/model.pt``; the next
   ``POST /infer`` equals a fresh reference made with the new weights, and the server log shows the reload.

Prints a PASS/FAIL table per bundle and exits 1 if any check failed. Not part of ``make test`` (it needs the separate
venv and several minutes per bundle).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO, "bundles")
DEMO_CT = os.path.join(REPO, "data", "demo", "ct")
DEMO_NUCLEI = os.path.join(REPO, "data", "demo", "nuclei")

TORCH_PIN = "torch==2.13.0"
STACK = [TORCH_PIN, "monai==1.6.1", "monailabel==0.8.5", "pydicom==2.4.4", "pynetdicom==2.0.2",
         "dicomweb-client==0.59.1"]
#: written into the venv once it is complete; a venv whose stamp differs is (re)installed
STAMP_NAME = ".monailabel_check_stamp.json"
SERVER_CONFS = ["zoo_source", "ngc", "sam2", "false", "preload", "false"]
RANDOM_WEIGHTS_MSG = "Checkpoint keys don't match"


def log(msg: str) -> None:
    print(f"[monailabel_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# --------------------------------------------------------------------------------------------------- the venv
def _stamp() -> dict:
    with open(os.path.join(REPO, "setup.cfg"), "rb") as f:
        setup_hash = hashlib.sha256(f.read()).hexdigest()
    return {"stack": STACK, "setup.cfg": setup_hash}


def patch_torchvision(py: str) -> str:
    """Guard torchvision's two ``register_fake`` meta registrations with ``extension._has_ops()``.

    The only torchvision wheels on the reachable index are CUDA builds; next to torch's CPU build their C++ ops do
    not load and ``import torchvision`` dies in ``_meta_registrations.py`` (``operator torchvision::nms does not
    exist``), which breaks every ``monailabel.tasks`` import. Idempotent; returns a status word."""
    code = r'''
import importlib.util, os, re, sys
spec = importlib.util.find_spec("torchvision")
path = os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py")
src = open(path).read()
marker = "# monailabel_check: guarded"
if marker in src:
    print("already"); sys.exit(0)
pat = re.compile(r'^@torch\.library\.register_fake\("torchvision::(\w+)"\)\n(def \w+\()', re.M)
n = len(pat.findall(src))
if n == 0:
    print("nothing"); sys.exit(0)
helper = (
    "\n\ndef _register_fake_if_ops(name):  " + marker + "\n"
    "    from torchvision import extension\n"
    "    if extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n"
)
src = pat.sub(lambda m: '@_register_fake_if_ops("torchvision::%s")\n%s' % (m.group(1), m.group(2)), src)
# put the helper after the last top-level import
lines = src.split("\n")
last_import = max(i for i, l in enumerate(lines) if l.startswith(("import ", "from ")))
lines.insert(last_import + 1, helper)
open(path, "w").write("\n".join(lines))
print("patched %d" % n)
'''
    out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([py, "-c", "import torchvision.utils"], check=True)
    return out


def ensure_venv(venv: str, rebuild: bool = False) -> str:
    """Create (or reuse) the MONAI Label venv; returns its python."""
    py = os.path.join(venv, "bin", "python")
    stamp_path = os.path.join(venv, STAMP_NAME)
    want = _stamp()
    if not rebuild and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            have = json.load(f)
        if have == want:
            log(f"reusing MONAI Label venv {venv}")
            return py
        if have.get("stack") == want["stack"]:  # only the project changed: reinstall it
            run([py, "-m", "pip", "install", "-q", "--no-build-isolation", TORCH_PIN, "-e", REPO])
            with open(stamp_path, "w") as f:
                json.dump(want, f)
            return py
    t0 = time.time()
    if rebuild and os.path.isdir(venv):
        shutil.rmtree(venv)
    if not os.path.isfile(py):
        base = getattr(sys, "_base_executable", None) or sys.executable
        run([base, "-m", "venv", venv])
    env = dict(os.environ, SAM2_BUILD_CUDA="0")
    pip = [py, "-m", "pip", "install", "-q"]
    run(pip + [TORCH_PIN], env=env)  # first: the CPU build from the local wheel folder
    run(pip + ["--no-build-isolation"] + STACK, env=env)
    log("torchvision guard: " + patch_torchvision(py))
    run(pip + ["--no-build-isolation", TORCH_PIN, "-e", REPO], env=env)
    run([py, "-m", "pip", "check"])
    subprocess.run([py, "-c", "import monailabel.interfaces.app, monailabel.tasks.infer.bundle, shared_networks"],
                   check=True)
    with open(stamp_path, "w") as f:
        json.dump(want, f)
    log(f"MONAI Label venv ready in {time.time() - t0:.0f} s: {venv}")
    return py


# ------------------------------------------------------------------------------------------ bundle description
class BundleSpec:
    """What the check needs to know about a bundle, all read from ``configs/metadata.json`` (and the configs)."""

    def __init__(self, path: str, image_ext: str | None = None):
        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path.rstrip("/"))
        meta_path = os.path.join(self.path, "configs", "metadata.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{self.path} is not a bundle: configs/metadata.json is missing.")
        with open(meta_path) as f:
            self.meta = json.load(f)
        fmt = self.meta["network_data_format"]
        self.input_key, image = next(iter(fmt["inputs"].items()))
        self.output_key, pred = next(iter(fmt["outputs"].items()))
        self.dims = len(image.get("spatial_shape") or [0, 0, 0])
        self.in_channels = int(image.get("num_channels", 1))
        self.channel_def = {int(k): str(v) for k, v in pred.get("channel_def", {}).items()}
        self.num_classes = int(pred.get("num_channels", len(self.channel_def) or 2))
        # what MONAI Label shows (tasks/infer/bundle.py): names lower-cased, background dropped
        self.labels = {v.lower(): k for k, v in self.channel_def.items() if v.lower() != "background"}
        self.image_ext = image_ext or self._guess_ext()

    def _guess_ext(self) -> str:
        if self.dims == 3:
            return ".nii.gz"
        # 2D: metadata's data_type if it names a file format (MONAI Label's datastore lists *.png, *.jpg, *.tif)
        data_type = str(self.meta.get("data_type", "")).lower()
        for key, ext in (("tif", ".tif"), ("png", ".png"), ("jp", ".jpg")):
            if key in data_type:
                return ext
        # 2D: the first image ending any of the bundle's configs mentions (e.g. a glob or output_ext), else PNG
        for cfg in ("inference.json", "train.json"):
            p = os.path.join(self.path, "configs", cfg)
            if os.path.isfile(p):
                text = open(p).read().lower()
                hits = [(text.find(e), e) for e in (".png", ".tif", ".jpg", ".nii.gz") if e in text]
                if hits:
                    return min(hits)[1]
        return ".png"


def find_bundles(names, use_all: bool) -> list[str]:
    if use_all:
        found = sorted(os.path.join(BUNDLES_DIR, d) for d in os.listdir(BUNDLES_DIR)
                       if os.path.isfile(os.path.join(BUNDLES_DIR, d, "configs", "metadata.json")))
        if not found:
            raise SystemExit(f"no bundles (folders with configs/metadata.json) in {BUNDLES_DIR}")
        return found
    if not names:
        raise SystemExit("name one or more bundles (folders in bundles/ or paths), or pass --all")
    out = []
    for n in names:
        p = n if os.path.isdir(n) else os.path.join(BUNDLES_DIR, n)
        if not os.path.isfile(os.path.join(p, "configs", "metadata.json")):
            avail = sorted(os.listdir(BUNDLES_DIR)) if os.path.isdir(BUNDLES_DIR) else []
            raise SystemExit(f"{n!r} is not a bundle (no configs/metadata.json); bundles here: {avail}")
        out.append(os.path.abspath(p))
    return out


# ------------------------------------------------------------------------------------------------ config edits
def _set_path(cfg, key: str, value) -> None:
    parts = key.split("#")
    node = cfg
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_sets(bundle_copy: str, sets) -> list[str]:
    """``FILE:KEY=JSON`` edits of the throwaway copy's configs (e.g. ``inference.json:sw_overlap=0.25``)."""
    done = []
    for s in sets or []:
        try:
            target, value = s.split("=", 1)
            fname, key = target.split(":", 1)
        except ValueError:
            raise SystemExit(f"--set {s!r}: expected FILE:KEY=JSON, e.g. inference.json:sw_overlap=0.25") from None
        try:
            val = json.loads(value)
        except json.JSONDecodeError:
            val = value
        path = os.path.join(bundle_copy, "configs", fname)
        with open(path) as f:
            cfg = json.load(f)
        _set_path(cfg, key, val)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=4)
        done.append(f"{fname}:{key}={json.dumps(val)}")
    return done


# --------------------------------------------------------------------------------------------- data and model
def make_studies(spec: BundleSpec, studies: str, ref_in: str) -> list[str]:
    """Two real images with labels in ``studies`` (labels under ``labels/final``, where MONAI Label's datastore
    reads them); the first image also alone in ``ref_in`` for the bundle's own inference. Returns image ids."""
    import numpy as np

    os.makedirs(os.path.join(studies, "labels", "final"), exist_ok=True)
    os.makedirs(ref_in, exist_ok=True)
    ext = spec.image_ext
    ids = ["demo_a", "demo_b"]
    if spec.dims == 3:
        import nibabel as nib

        img = nib.load(os.path.join(DEMO_CT, "image.nii.gz"))
        lab = nib.load(os.path.join(DEMO_CT, "label_btcv.nii.gz"))
        lab_arr = np.asarray(lab.dataobj).astype(np.uint8)
        lab_arr[lab_arr >= spec.num_classes] = 0
        lab = nib.Nifti1Image(lab_arr, lab.affine, lab.header)
        crop = (slice(8, 112), slice(6, 96), slice(0, 30))  # a second, smaller case (affine follows the crop)
        pairs = [(img, lab), (img.slicer[crop], lab.slicer[crop])]
        for i, (im, lb) in zip(ids, pairs):
            if ext not in (".nii.gz", ".nii"):
                raise SystemExit(f"{spec.name}: 3D studies are written as NIfTI, not {ext}")
            nib.save(im, os.path.join(studies, i + ext))
            nib.save(lb, os.path.join(studies, "labels", "final", i + ext))
        shutil.copy(os.path.join(studies, ids[0] + ext), os.path.join(ref_in, ids[0] + ext))
        return ids
    # 2D: the nuclei image (uint16, 0..235) as 8-bit grey or RGB, foreground mask as class 1
    import tifffile
    from PIL import Image

    img = tifffile.imread(os.path.join(DEMO_NUCLEI, "image.tif")).astype(np.float64)
    img = np.round(255 * (img - img.min()) / max(img.max() - img.min(), 1)).astype(np.uint8)
    mask = (tifffile.imread(os.path.join(DEMO_NUCLEI, "mask.tif")) > 0).astype(np.uint8)
    pairs = [(img, mask), (img[64:448, 32:416], mask[64:448, 32:416])]
    for i, (im, lb) in zip(ids, pairs):
        if spec.in_channels == 3:
            im = np.repeat(im[..., None], 3, axis=-1)
        elif spec.in_channels != 1:
            raise SystemExit(f"{spec.name}: no 2D demo image with {spec.in_channels} channels")
        for arr, dst in ((im, os.path.join(studies, i + ext)), (lb, os.path.join(studies, "labels", "final", i + ext))):
            if ext in (".tif", ".tiff"):
                tifffile.imwrite(dst, arr)
            elif ext in (".png", ".jpg", ".jpeg", ".bmp"):
                if ext in (".jpg", ".jpeg") and "labels" in dst:  # labels must stay lossless
                    raise SystemExit(f"{spec.name}: labels cannot be stored as JPEG; pass --image-ext .png")
                Image.fromarray(arr).save(dst)
            else:
                raise SystemExit(f"{spec.name}: cannot write a 2D study as {ext}")
    shutil.copy(os.path.join(studies, ids[0] + ext), os.path.join(ref_in, ids[0] + ext))
    return ids


def save_initial_weights(bundle_copy: str, seed: int = 0) -> str:
    """``models/model.pt``: the network of ``configs/inference.json`` as initialised (seeded), a plain state dict."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_copy, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle_copy, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_copy
    torch.manual_seed(seed)
    sys.path.insert(0, bundle_copy)
    try:
        net = parser.get_parsed_content("network_def", instantiate=True)
    finally:
        sys.path.remove(bundle_copy)
    path = os.path.join(bundle_copy, "models", "model.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, path)
    return path


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_run_reference(spec: BundleSpec, bundle_copy: str, ref_in: str, out_dir: str, env: dict) -> str:
    """The bundle's own inference (``python -m monai.bundle run``) on the image in ``ref_in``; returns the label."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", os.path.join(bundle_copy, "configs", "inference.json"),
           "--meta_file", os.path.join(bundle_copy, "configs", "metadata.json"),
           "--bundle_root", bundle_copy, "--dataset_dir", ref_in, "--output_dir", out_dir,
           "--device", "$torch.device('cpu')", "--num_workers", "0"]
    logging_conf = os.path.join(bundle_copy, "configs", "logging.conf")
    if os.path.isfile(logging_conf):
        cmd += ["--logging_file", logging_conf]
    with open(out_dir + ".log", "w") as logf:
        r = subprocess.run(cmd, cwd=bundle_copy, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"monai.bundle run failed (exit {r.returncode}); see {out_dir}.log:\n"
                           + tail(out_dir + ".log"))
    outs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(out_dir) for f in fs)
    saver = _saver(os.path.join(bundle_copy, "configs", "inference.json"), spec.output_key)
    if len(outs) > 1:  # e.g. probabilities saved next to the label: keep the file of the output key's SaveImaged
        postfix = saver.get("output_postfix", "trans")  # MONAI's default postfix
        outs = [o for o in outs if f"_{postfix}." in os.path.basename(o)]
    if len(outs) != 1:
        raise RuntimeError(f"monai.bundle run wrote no single '{spec.output_key}' file in {out_dir}: {outs}")
    return outs[0]


def _saver(config_file: str, key: str) -> dict:
    """The ``*SaveImaged`` entry of ``postprocessing`` that saves ``key`` (``{}`` if none)."""
    with open(config_file) as f:
        post = json.load(f).get("postprocessing", {})
    transforms = post.get("transforms", []) if isinstance(post, dict) else post
    for t in transforms if isinstance(transforms, list) else []:
        keys = t.get("keys") if isinstance(t, dict) else None
        keys = [keys] if isinstance(keys, str) else keys or []
        if str(t.get("_target_", "")).endswith("SaveImaged") and key in keys:
            return t
    return {}


def saved_scale(bundle_copy: str, key: str) -> float:
    """SaveImaged's ``scale`` (e.g. 255: masks saved as 0/255, PraNet style); MONAI Label returns class ids."""
    scale = _saver(os.path.join(bundle_copy, "configs", "inference.json"), key).get("scale")
    return float(scale) if isinstance(scale, (int, float)) and scale else 1.0


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def load_label(path: str):
    """(array with channel/singleton dims dropped, affine or None) as MONAI's ``LoadImage`` reads the file, the
    same reader for MONAI Label's output, the bundle's output and the input image, so orientations agree."""
    import numpy as np
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(path)
    arr = np.asarray(img)
    affine = None
    if path.lower().endswith((".nii", ".nii.gz")):
        affine = np.asarray(img.affine, dtype=np.float64)
    return np.squeeze(arr), affine


def compare_labels(got: str, ref: str, image: str, ref_scale: float = 1.0) -> tuple[bool, str]:
    """MONAI Label's label vs the bundle's own (its values divided by ``ref_scale``): identical voxels, and the
    input image's shape and affine."""
    import numpy as np

    a, aff_a = load_label(got)
    b, aff_b = load_label(ref)
    b = b / ref_scale
    im, aff_im = load_label(image)
    im_shape = im.shape[:2] if (im.ndim == 3 and im.shape[-1] in (3, 4) and aff_im is None) else im.shape  # RGB
    problems = []
    if a.shape != b.shape:
        problems.append(f"shape {a.shape} != bundle run {b.shape}")
    if a.shape != tuple(im_shape):
        problems.append(f"shape {a.shape} != image {tuple(im_shape)}")
    if aff_a is not None and aff_b is not None and not np.allclose(aff_a, aff_b, atol=1e-4):
        problems.append("affine differs from the bundle run's")
    if aff_a is not None and aff_im is not None and not np.allclose(aff_a, aff_im, atol=1e-4):
        problems.append("affine differs from the image's")
    agree = float((np.rint(a).astype(np.int64) == np.rint(b).astype(np.int64)).mean()) if a.shape == b.shape else 0.0
    values = sorted(int(v) for v in np.unique(np.rint(a)))
    if agree != 1.0:
        problems.append(f"voxel agreement {agree:.6f} != 1")
    detail = f"agreement {agree:.6f}, shape {a.shape}, classes {values[:16]}"
    return not problems, detail + ("; " + "; ".join(problems) if problems else "")


# ------------------------------------------------------------------------------------------------ HTTP helpers
def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 600):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers or {}), e.read()


def http_json(method: str, url: str, payload=None, timeout: float = 600):
    body = None if payload is None else json.dumps(payload).encode()
    status, _, data = http(method, url, body, {"Content-Type": "application/json"} if body else {}, timeout)
    try:
        return status, json.loads(data.decode() or "null")
    except ValueError:
        return status, data.decode(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """MONAI Label started WITHOUT a shell (its PID is the server's own), stopped on every exit path."""

    live: list[Server] = []

    def __init__(self, app: str, studies: str, model: str, log_path: str, env: dict, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies,
               "--conf", "models", model]
        for k, v in zip(SERVER_CONFS[::2], SERVER_CONFS[1::2]):
            cmd += ["--conf", k, v]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        log("$ " + " ".join(cmd))
        self._logf = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                     cwd=os.path.dirname(app), start_new_session=True)
        Server.live.append(self)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                status, _ = http_json("GET", self.url + "/info/", timeout=10)
                if status == 200:
                    return time.time() - t0
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n" + self.log_tail())

    def log_text(self) -> str:
        self._logf.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 40) -> str:
        return tail(self.log_path, n)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # clean uvicorn shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # train jobs are children of the server; anything left in its session goes too
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._logf.closed:
            self._logf.close()
        if self in Server.live:
            Server.live.remove(self)


def _stop_all_servers(*_):
    for s in list(Server.live):
        s.stop()


def _on_signal(signum, _frame):
    _stop_all_servers()
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------- MONAI Label in-process
WEIGHTS_CODE = r'''
import json, os, sys, torch
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
bundle = sys.argv[1]
task = BundleInferTask(bundle, conf={"preload": "false"})
out = {"valid": bool(task.is_valid())}
if task.is_valid():
    info = task.info()
    out["info"] = {k: info.get(k) for k in ("type", "labels", "dimension", "version")}
    net = task._get_network("cpu", None)
    sd = torch.load(os.path.join(bundle, "models", "model.pt"), map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    mine = net.state_dict()
    out["missing"] = sorted(set(mine) - set(sd))[:5]
    out["unexpected"] = sorted(set(sd) - set(mine))[:5]
    out["differ"] = sorted(k for k in set(mine) & set(sd) if not torch.equal(mine[k].cpu(), sd[k].cpu()))[:5]
    out["n"] = len(mine)
out["train_valid"] = bool(BundleTrainTask(bundle, conf={}).is_valid())
print("RESULT " + json.dumps(out))
'''


def api_weights_check(bundle_copy: str, env: dict) -> tuple[bool, str, dict]:
    """§4.2 guard at the API level: the network MONAI Label builds holds exactly the tensors of models/model.pt."""
    r = subprocess.run([sys.executable, "-c", WEIGHTS_CODE, bundle_copy], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(bundle_copy))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return False, "BundleInferTask failed: " + (r.stderr or r.stdout)[-1500:], {}
    res = json.loads(line[7:])
    if not res["valid"]:
        return False, "BundleInferTask(...).is_valid() is False", res
    bad = {k: res[k] for k in ("missing", "unexpected", "differ") if res[k]}
    ok = not bad and res["train_valid"]
    detail = f"{res['n']} tensors equal to models/model.pt" if not bad else f"weights differ: {bad}"
    if not res["train_valid"]:
        detail += "; BundleTrainTask not valid"
    return ok, detail, res


# ---------------------------------------------------------------------------------------------- one bundle
class Results:
    def __init__(self, bundle: str):
        self.bundle = bundle
        self.rows: list[tuple[str, str, str]] = []
        self.times: dict[str, float] = {}

    def add(self, check: str, ok: bool | None | str, detail: str = "") -> bool:
        status = ok if isinstance(ok, str) else "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((check, status, detail))
        log(f"{self.bundle}: {status} {check}" + (f" ({detail})" if detail else ""))
        return status == "PASS"

    @property
    def failed(self) -> bool:
        return any(s == "FAIL" for _, s, _ in self.rows) or not self.rows


def check_bundle(src: str, work: str, args, env: dict, stock_app: str) -> Results:
    spec = BundleSpec(src, args.image_ext)
    res = Results(spec.name)
    bdir = os.path.join(work, spec.name)
    app = os.path.join(bdir, "monaibundle")
    studies = os.path.join(bdir, "studies")
    ref_in = os.path.join(bdir, "ref_input")
    bundle_copy = os.path.join(app, "model", spec.name)
    shutil.copytree(stock_app, app, symlinks=True)
    os.makedirs(os.path.dirname(bundle_copy), exist_ok=True)
    # a throwaway copy: the server-side train rewrites models/model.pt and writes models/checkpoints, eval/
    shutil.copytree(src, bundle_copy, ignore=shutil.ignore_patterns("eval", "runs", "__pycache__", "checkpoints"))
    edits = apply_sets(bundle_copy, args.set)
    if edits:
        res.add("config edits of the COPY (--set)", "NOTE", ", ".join(edits))
    model_pt = os.path.join(bundle_copy, "models", "model.pt")
    if os.path.isfile(model_pt) and not args.init_weights:
        weights_from = "bundle's models/model.pt"
    else:
        save_initial_weights(bundle_copy)
        weights_from = "initialised network (seed 0)"
    ids = make_studies(spec, studies, ref_in)
    image = os.path.join(studies, ids[0] + spec.image_ext)
    res.add("prepare app, studies, bundle copy", True,
            f"{spec.dims}D, {spec.in_channels} ch, {spec.image_ext}, weights: {weights_from}")

    # the bundle's own inference: the reference the server's label must equal
    t0 = time.time()
    try:
        ref1 = bundle_run_reference(spec, bundle_copy, ref_in, os.path.join(bdir, "ref_before"), env)
        res.times["bundle run (infer)"] = time.time() - t0
        res.add("monai.bundle run inference", True, f"{time.time() - t0:.0f} s")
    except Exception as e:  # noqa: BLE001
        res.add("monai.bundle run inference", False, str(e)[-800:])
        return res

    ok, detail, api = api_weights_check(bundle_copy, env)
    res.add("API: BundleInferTask weights == model.pt", ok, detail)

    server = Server(app, studies, spec.name, os.path.join(bdir, "server.log"), env)
    try:
        try:
            res.times["server start"] = server.wait_ready(args.start_timeout)
            res.add("server start", True, f"{res.times['server start']:.0f} s, port {server.port}")
        except RuntimeError as e:
            res.add("server start", False, str(e)[-1500:])
            return res

        status, info = http_json("GET", server.url + "/info/")
        model = (info or {}).get("models", {}).get(spec.name) if isinstance(info, dict) else None
        res.add("/info/ lists the model", model is not None,
                f"models: {sorted((info or {}).get('models', {}))}" if isinstance(info, dict) else str(info)[:300])
        if model is None:
            return res
        res.add("/info/ labels == channel_def", model.get("labels") == spec.labels,
                f"{model.get('labels')}" + ("" if model.get("labels") == spec.labels else f" != {spec.labels}"))
        res.add("/info/ dimension", model.get("dimension") == spec.dims, f"{model.get('dimension')}")
        res.add("/info/ lists the trainer", spec.name in info.get("trainers", {}), "")

        def infer(tag: str) -> str | None:
            t = time.time()
            url = f"{server.url}/infer/{spec.name}?image={ids[0]}&output=image"
            body = urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode()
            status, headers, data = http("POST", url, body, {"Content-Type": "application/x-www-form-urlencoded"},
                                         timeout=args.infer_timeout)
            res.times[f"server infer ({tag})"] = time.time() - t
            if status != 200:
                res.add(f"POST /infer ({tag})", False, f"HTTP {status}: {data[:300]!r}\n" + server.log_tail(25))
                return None
            cd = headers.get("content-disposition") or headers.get("Content-Disposition") or ""
            ext = next((e for e in (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".jpg", ".nrrd", ".seg.nrrd")
                        if cd.lower().rstrip('"').endswith(e)), spec.image_ext)
            out = os.path.join(bdir, f"server_label_{tag.replace(' ', '_')}{ext}")
            with open(out, "wb") as f:
                f.write(data)
            res.add(f"POST /infer ({tag})", True, f"{time.time() - t:.0f} s, {len(data)} bytes")
            return out

        lab1 = infer("before train")
        if lab1:
            ok, detail = compare_labels(lab1, ref1, image, saved_scale(bundle_copy, spec.output_key))
            res.add("label == monai.bundle run (before train)", ok, detail)
            if ok and "classes [0]" in detail:  # equal, but trivially: nothing segmented with these weights
                res.add("label has foreground", "NOTE", "all background with these weights: the agreement above "
                        "cannot tell the networks apart; check with trained weights")
        log_txt = server.log_text()
        res.add("no silent random weights (server log)", RANDOM_WEIGHTS_MSG not in log_txt,
                "" if RANDOM_WEIGHTS_MSG not in log_txt else f"log says {RANDOM_WEIGHTS_MSG!r}")
        if args.skip_train:
            res.add("POST /train", None, "--skip-train")
            return res

        def train(n: int) -> bool:
            """One server-side train request; True when it ran to DONE and rewrote models/model.pt."""
            tag = "" if n == 1 else f" #{n}"
            before = (os.path.getmtime(model_pt), sha256(model_pt))
            t = time.time()
            epochs = args.train_epochs if n == 1 else 1
            payload = {"max_epochs": epochs, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
            status, reply = http_json("POST", f"{server.url}/train/{spec.name}", payload)
            if status != 200 or not isinstance(reply, dict):
                return res.add(f"POST /train{tag}", False, f"HTTP {status}: {str(reply)[:300]}")
            task_id, state = reply.get("id"), None
            while time.time() - t < args.train_timeout:
                time.sleep(3)
                _, st = http_json("GET", f"{server.url}/train/?all=false")
                if isinstance(st, dict) and st.get("id") == task_id:
                    state = st.get("status")
                    if state in ("DONE", "ERROR", "STOPPED"):
                        break
            res.times[f"server train{tag} ({epochs} epoch{'s' if epochs > 1 else ''})"] = time.time() - t
            if not res.add(f"POST /train{tag} runs to DONE", state == "DONE", f"{state} after {time.time() - t:.0f} s"
                           + ("" if state == "DONE" else "\n" + server.log_tail(30))):
                if state not in ("ERROR", "STOPPED"):
                    http("DELETE", f"{server.url}/train/")
                return False
            after = (os.path.getmtime(model_pt), sha256(model_pt))
            updated = after[0] != before[0] and after[1] != before[1]
            why = ("the train config saved no weights in a 1-epoch run" if n == 1 else
                   "a second 1-epoch request saved nothing (resumed from an earlier run's checkpoint?)")
            return res.add(f"train{tag} rewrote models/model.pt", updated,
                           "mtime and sha256 changed" if updated else f"models/model.pt unchanged: {why}")

        if not train(1):
            return res
        lab2 = infer("after train")
        if lab2:
            ref2 = bundle_run_reference(spec, bundle_copy, ref_in, os.path.join(bdir, "ref_after"), env)
            ok, detail = compare_labels(lab2, ref2, image, saved_scale(bundle_copy, spec.output_key))
            same, _ = compare_labels(lab2, lab1, image) if lab1 else (False, "")
            res.add("next infer uses the new weights (== bundle run with them)", ok,
                    detail + ("; output unchanged by the train" if same else "; output changed by the train"))
            if ok and "classes [0]" in detail:
                res.add("label has foreground (after train)", "NOTE", "still all background: train longer "
                        "(--train-epochs) for a comparison that can tell the networks apart")
            reloaded = "Reload model from cache" in server.log_text()
            res.add("server log shows the model reload", reloaded, "" if reloaded else "no 'Reload model' line")
        # annotators train again after more labels: a second request must fine-tune from the new model.pt again
        for n in range(2, args.trains + 1):
            if not train(n):
                break
        log_txt = server.log_text()
        res.add("no silent random weights after train (server log)", RANDOM_WEIGHTS_MSG not in log_txt, "")
    finally:
        server.stop()
    ok, detail, _ = api_weights_check(bundle_copy, env)
    res.add("API: BundleInferTask weights == new model.pt", ok, detail)
    return res


# ------------------------------------------------------------------------------------------------------ main
def print_table(all_results: list[Results], venv_s: float | None) -> None:
    w = max([len(c) for r in all_results for c, _, _ in r.rows] + [20])
    print("\n" + "=" * (w + 60))
    print("MONAI Label 0.8.5 check" + (f" (venv ready in {venv_s:.0f} s)" if venv_s is not None else ""))
    for r in all_results:
        print("-" * (w + 60))
        print(f"{r.bundle}: {'FAIL' if r.failed else 'PASS'}")
        for check, status, detail in r.rows:
            lines = [ln for ln in (detail or "").splitlines() if ln.strip()]
            print(f"  {status:4}  {check:<{w}}  {lines[0][:160] if lines else ''}")
            if status == "FAIL" and len(lines) > 1:  # the end of an error says what went wrong
                for ln in lines[-4:]:
                    print(f"  {'':4}  {'':<{w}}  | {ln[:200]}")
        if r.times:
            print("  timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.times.items()))
    print("=" * (w + 60))
    failed = [r.bundle for r in all_results if r.failed]
    print("RESULT: " + ("FAIL (" + ", ".join(failed) + ")" if failed else f"PASS ({len(all_results)} bundle(s))"))


def inner(args) -> int:
    import tempfile

    bundles = find_bundles(args.bundles, args.all)
    if args.workdir:
        work = os.path.abspath(args.workdir)
        os.makedirs(work, exist_ok=True)
        owned = False
    else:
        work = tempfile.mkdtemp(prefix="monailabel_check_")
        owned = True
    for b in bundles:  # never delete anything this script did not make
        d = os.path.join(work, os.path.basename(b))
        if os.path.exists(d):
            if not os.path.isfile(os.path.join(d, ".monailabel_check")):
                raise SystemExit(f"{d} exists and was not made by this script; choose another --workdir")
            shutil.rmtree(d)
        os.makedirs(d)
        open(os.path.join(d, ".monailabel_check"), "w").close()
    tmp = os.path.join(work, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.environ["TMPDIR"] = tmp  # MONAI Label leaves log configs / results in $TMPDIR
    tempfile.tempdir = None
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    atexit.register(_stop_all_servers)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log(f"work folder: {work}")

    stock = os.path.join(work, "_stock_app")
    if not os.path.isdir(os.path.join(stock, "monaibundle")):
        run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", stock],
            env=env, stdout=subprocess.DEVNULL)
    results = []
    for b in bundles:
        log(f"=== {os.path.basename(b)}")
        try:
            results.append(check_bundle(b, work, args, env, os.path.join(stock, "monaibundle")))
        except Exception as e:  # noqa: BLE001
            r = Results(os.path.basename(b))
            r.add("unexpected error", False, "".join(traceback.format_exception_only(type(e), e)).strip())
            traceback.print_exc()
            results.append(r)
    _stop_all_servers()
    print_table(results, args.venv_seconds)
    failed = any(r.failed for r in results)
    if owned and not failed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"work folder kept: {work}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python3 scripts/monailabel_check.py --all",
    )
    p.add_argument("bundles", nargs="*", help="bundle names (folders in bundles/) or bundle paths")
    p.add_argument("--all", action="store_true", help="check every folder in bundles/")
    p.add_argument("--venv", default=os.path.join(REPO, ".venv-monailabel"),
                   help="MONAI Label venv, created on first use (default: .venv-monailabel in the repository)")
    p.add_argument("--workdir", default=None,
                   help="work folder (default: a new temporary folder, deleted after a passing run)")
    p.add_argument("--keep", action="store_true", help="keep the work folder after a passing run")
    p.add_argument("--rebuild-venv", action="store_true", help="delete and rebuild the venv first")
    p.add_argument("--setup-only", action="store_true", help="only build (or check) the venv")
    p.add_argument("--init-weights", action="store_true",
                   help="use the initialised network as models/model.pt even if the bundle has trained weights")
    p.add_argument("--skip-train", action="store_true", help="skip the server-side training step")
    p.add_argument("--image-ext", default=None, help="2D bundles: file format of the studies (default: from configs)")
    p.add_argument("--set", action="append", metavar="FILE:KEY=JSON",
                   help="edit the throwaway copy's config, e.g. inference.json:sw_overlap=0.25 (reported in the "
                        "table; never the source bundle)")
    p.add_argument("--train-epochs", type=int, default=1,
                   help="max_epochs of the first POST /train (later ones ask for 1); raise it for bundles whose "
                        "initialised network segments nothing, so that the after-train comparison has foreground")
    p.add_argument("--trains", type=int, default=2,
                   help="server-side train requests in a row (default 2: a second one must also update the weights)")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds for the server to come up")
    p.add_argument("--infer-timeout", type=float, default=1200, help="seconds for one POST /infer")
    p.add_argument("--train-timeout", type=float, default=1800, help="seconds for the 1-epoch train")
    p.add_argument("--_inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_venv-seconds", dest="venv_seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._inner:
        return inner(args)
    if not args.setup_only:
        find_bundles(args.bundles, args.all)  # fail fast on a typo, before building anything
    t0 = time.time()
    py = ensure_venv(os.path.abspath(args.venv), args.rebuild_venv)
    venv_s = time.time() - t0
    if args.setup_only:
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [py, os.path.abspath(__file__), *argv, "--_inner", "--_venv-seconds", f"{venv_s:.1f}"]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.path.join(os.path.abspath(args.venv), "bin") + os.pathsep + env.get("PATH", "")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

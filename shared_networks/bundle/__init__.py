"""Transforms, handlers and helpers shared by the project's MONAI bundles (``bundles/*/configs/*.json``).

Dataset layout (every bundle): ``dataset_dir/imagesTr/<case>.<ext>`` + ``dataset_dir/labelsTr/<case>.<ext>``
(+ optional ``imagesTs/``), or a ``dataset_dir/dataset.json`` data list; see :mod:`shared_networks.bundle.data`.

- data lists: :func:`load_datalist`, :func:`list_images`, :func:`split_cases`
- transforms: :class:`SafeLoadImaged`, :class:`ValidateImaged`, :class:`ValidateLabeld`, :class:`SafeSaveImaged`,
  :func:`check_output_dir`
- handlers: :func:`load_checkpoint`, :class:`StrictCheckpointLoader`, :func:`latest_checkpoint`,
  :func:`attach_resume`, :class:`BestModelSaver`, :class:`ClassMetricsSaver`, :class:`GradientClipping`,
  :class:`LossProgressBar`,
  :func:`rank_zero_handlers`
- export: :func:`shared_networks.bundle.export.export_network` (``python -m shared_networks.bundle.export``)
- :func:`as_bool`: command-line flags (``--resume false``) read as booleans
- :data:`META_SCHEMA`: path of the shipped copy of the Model Zoo metadata schema ``meta_schema_20240725.json``
"""

import os

from .data import IMAGE_EXTENSIONS, list_images, load_datalist, split_cases
from .handlers import (
    BestModelSaver,
    ClassMetricsSaver,
    GradientClipping,
    LossProgressBar,
    StrictCheckpointLoader,
    attach_resume,
    latest_checkpoint,
    load_checkpoint,
    rank_zero_handlers,
)
from .transforms import SafeLoadImaged, SafeSaveImaged, ValidateImaged, ValidateLabeld, check_output_dir
from .utils import as_bool

#: Model Zoo metadata schema 20240725 (verbatim copy, md5 06954cad2cc5d3784e72077ac76f0fc8) for offline checks.
META_SCHEMA = os.path.join(os.path.dirname(__file__), "meta_schema_20240725.json")
#: Its public URL, the value of ``"schema"`` in every bundle's metadata.json.
META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "META_SCHEMA",
    "META_SCHEMA_URL",
    "load_datalist",
    "list_images",
    "split_cases",
    "SafeLoadImaged",
    "ValidateImaged",
    "ValidateLabeld",
    "SafeSaveImaged",
    "check_output_dir",
    "load_checkpoint",
    "StrictCheckpointLoader",
    "latest_checkpoint",
    "attach_resume",
    "BestModelSaver",
    "ClassMetricsSaver",
    "LossProgressBar",
    "GradientClipping",
    "rank_zero_handlers",
    "as_bool",
]

"""Carina's model package: pixels in, findings and heatmaps out.

Pure: no knowledge of the node, the database or DICOM networking.

The public names below are imported lazily (PEP 562) so that `import
inference.types`, which the rest of the node does for the shared dataclasses,
does not pull in torch, MONAI and torchxrayvision (seconds of start-up).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # decode
    "DEFAULT_MAX_PIXELS": "inference.decode",
    "DecodeError": "inference.decode",
    "decode_dicom": "inference.decode",
    "decode_dicom_file": "inference.decode",
    "decode_png_or_jpeg": "inference.decode",
    # preprocess
    "ModelInput": "inference.preprocess",
    "center_crop_geometry": "inference.preprocess",
    "prepare_input": "inference.preprocess",
    # model
    "MODEL_NAME": "inference.model",
    "PATHOLOGIES": "inference.model",
    "DevicePlan": "inference.model",
    "LoadedModel": "inference.model",
    "WeightsError": "inference.model",
    "build_demo_state_dict": "inference.model",
    "default_weights_path": "inference.model",
    "demo_version": "inference.model",
    "import_xrv_checkpoint": "inference.model",
    "load_model": "inference.model",
    "save_safetensors": "inference.model",
    "select_device": "inference.model",
    "warm_up": "inference.model",
    "write_weights": "inference.model",
    # cam, regions, engine, serialize
    "class_activation_maps": "inference.cam",
    "heatmaps_for_batch": "inference.cam",
    "find_regions": "inference.regions",
    "InferenceEngine": "inference.engine",
    "decode_image": "inference.engine",
    "sniff_format": "inference.engine",
    "BatchingEngine": "inference.batcher",
    "BatcherClosed": "inference.batcher",
    "SeverityBands": "inference.severity",
    "result_from_json": "inference.serialize",
    "result_to_json": "inference.serialize",
    # shared types
    "CHESTXRAY14": "inference.types",
    "DEMO_WARNING": "inference.types",
    "DecodedImage": "inference.types",
    "Finding": "inference.types",
    "Heatmaps": "inference.types",
    "ImageResult": "inference.types",
    "ModelInfo": "inference.types",
    "Region": "inference.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from inference.cam import class_activation_maps, heatmaps_for_batch  # noqa: F401
    from inference.decode import (  # noqa: F401
        DEFAULT_MAX_PIXELS,
        DecodeError,
        decode_dicom,
        decode_dicom_file,
        decode_png_or_jpeg,
    )
    from inference.batcher import BatcherClosed, BatchingEngine  # noqa: F401
    from inference.engine import InferenceEngine, decode_image, sniff_format  # noqa: F401
    from inference.model import (  # noqa: F401
        MODEL_NAME,
        PATHOLOGIES,
        DevicePlan,
        LoadedModel,
        WeightsError,
        build_demo_state_dict,
        default_weights_path,
        demo_version,
        import_xrv_checkpoint,
        load_model,
        save_safetensors,
        select_device,
        warm_up,
        write_weights,
    )
    from inference.preprocess import ModelInput, center_crop_geometry, prepare_input  # noqa: F401
    from inference.regions import find_regions  # noqa: F401
    from inference.serialize import result_from_json, result_to_json  # noqa: F401
    from inference.severity import SeverityBands  # noqa: F401
    from inference.types import (  # noqa: F401
        CHESTXRAY14,
        DEMO_WARNING,
        DecodedImage,
        Finding,
        Heatmaps,
        ImageResult,
        ModelInfo,
        Region,
    )

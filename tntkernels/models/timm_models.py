"""Our models in timm's registry: `timm.create_model("tntkernels_<name>", ...)` for every
`tntkernels.models.list_models()` name, with timm's arguments (pretrained, pretrained_cfg_overlay,
features_only, out_indices, num_classes, ...). Imported by `tntkernels.models` when timm is installed.

timm files an entry point under the last part of its module name (here "timm_models") and reads
the module's `default_cfgs` for its pretrained cfgs: TNT-S / TNT-B point at timm's released weights
(`tntkernels_tnt_s_patch16_224.in1k` → hub id "timm/tnt_s_patch16_224.in1k"), the others have none.
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, is_model, model_entrypoint, register_model

from .registry import MODEL_CONFIGS, TIMM_PREFIX, TIMM_WEIGHTS, build, default_pretrained_cfg

__all__: list[str] = []  # register_model appends each entry point


def _cfg_entry(name: str) -> tuple[str, dict]:
    cfg = {k: v for k, v in default_pretrained_cfg(name).items() if k not in ("architecture", "tag")}
    tag = TIMM_WEIGHTS[name].split(".", 1)[1] if name in TIMM_WEIGHTS else ""
    return TIMM_PREFIX + name + (f".{tag}" if tag else ""), cfg


default_cfgs = generate_default_cfgs(dict(_cfg_entry(name) for name in MODEL_CONFIGS))


def _entry_point(name: str):
    timm_name = TIMM_PREFIX + name

    def entry(pretrained: bool = False, **kwargs):
        # timm resolves pretrained_cfg (None or a tag) against default_cfgs under timm_name
        return build(name, timm_name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = timm_name
    entry.__module__ = __name__
    entry.__doc__ = f"tntkernels' {name} ({MODEL_CONFIGS[name][0].__name__}), built on tntkernels kernels."
    return entry


def _register() -> None:
    for name in MODEL_CONFIGS:
        timm_name = TIMM_PREFIX + name
        if is_model(timm_name) and model_entrypoint(timm_name).__module__ == __name__:
            continue  # already ours (a re-import): re-registering would only warn
        fn = _entry_point(name)
        globals()[timm_name] = fn
        register_model(fn)


_register()

